"""What does one audit document cost the MongoDB-compatible server? (finding for the relay)

Starts a throwaway server with ``hive_common.localdb`` (mongod if on PATH, else FerretDB),
then inserts batches of documents shaped like the relay's audit documents
(``insert_many(ordered=False)``, as ``AuditStore`` does) into three collections: one with
only ``_id``, one with the unique ``event_id`` index, one with that and the
``(ticket_id, sequence)`` index, as ``audit_trail`` and ``status_change_events`` have.
Reports the server process's CPU per document for each. Run:
``uv run --all-packages python -m bench.experiments.audit_insert_cost``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import uuid
from datetime import UTC, datetime
from typing import Any

from pymongo import ASCENDING, AsyncMongoClient

from bench.cpu import pids_with_argument, process_seconds
from hive_common.localdb import LocalMongo

VARIANTS: dict[str, list[list[tuple[str, int]]]] = {
    "_id only": [],
    "+ unique event_id": [[("event_id", ASCENDING)]],
    "+ unique event_id, (ticket_id, sequence)": [
        [("event_id", ASCENDING)],
        [("ticket_id", ASCENDING), ("sequence", ASCENDING)],
    ],
}


def audit_like(sequence: int) -> dict[str, Any]:
    """A document of the size and shape of a relayed STATUS_CHANGED event."""
    now = datetime.now(UTC)
    ticket_id = str(uuid.uuid4())
    return {
        "event_id": str(uuid.uuid4()),
        "sequence": sequence,
        "type": "STATUS_CHANGED",
        "ticket_id": ticket_id,
        "plan_id": "plan-1",
        "task_id": f"t{sequence}",
        "worker_id": "w1",
        "attempt": 1,
        "previous_status": "RUNNING",
        "status": "COMPLETED",
        "actor": "worker:w1",
        "occurred_at": now,
        "late_result": False,
        "details": {},
        "ticket": {
            "ticket_id": ticket_id,
            "plan_id": "plan-1",
            "task_id": f"t{sequence}",
            "task_type": "echo",
            "status": "COMPLETED",
            "attempt": 1,
            "parameters": {"message": "hello"},
            "required_capabilities": ["python"],
            "depends_on": [],
            "priority": "NORMAL",
            "max_retries": 2,
            "timeout_seconds": 300,
            "worker_id": "w1",
            "version": 4,
            "created_at": now,
            "updated_at": now,
            "result": {"echo": {"message": "hello"}},
            "error_message": "",
        },
    }


async def measure(uri: str, fragment: str, *, batches: int, batch_size: int) -> dict[str, float]:
    def server_cpu() -> float:
        return sum(process_seconds(pid) for pid in pids_with_argument(fragment))

    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(uri)
    results: dict[str, float] = {}
    try:
        database = client["audit_insert_cost"]
        for number, (name, indexes) in enumerate(VARIANTS.items()):
            collection = database[f"variant_{number}"]
            for index, keys in enumerate(indexes):
                await collection.create_index(keys, unique=index == 0)
            await collection.insert_many([audit_like(i) for i in range(batch_size)])  # warm-up
            before = server_cpu()
            for batch in range(batches):
                documents = [audit_like(batch * batch_size + i) for i in range(batch_size)]
                await collection.insert_many(documents, ordered=False)
            results[name] = (server_cpu() - before) / (batches * batch_size) * 1e6
    finally:
        await client.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=150)
    args = parser.parse_args()
    with LocalMongo() as server:
        per_document = asyncio.run(
            measure(
                server.uri,
                str(server.base_dir),
                batches=args.batches,
                batch_size=args.batch_size,
            )
        )
    print(
        json.dumps(
            {
                "server": server.kind,
                "documents_per_variant": args.batches * args.batch_size,
                "server_cpu_us_per_document": {k: round(v) for k, v in per_document.items()},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
