"""Which plan does PostgreSQL choose for DiscoverWorkers at 10,000 workers? (registry finding)

Starts the real registry on a fresh database, registers N workers through concurrent
Register RPCs (the same population as the benchmark: every worker has "python", 1 in
100 also "gpu" with label zone=b), then EXPLAIN ANALYZEs the shape of the registry's
discovery statement (storage/repository.py ``discovery_candidates``) for both queries.
Run: ``uv run --all-packages python -m bench.experiments.discovery_plan [--workers N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import psycopg
from psycopg.types.json import Jsonb

from bench import stack
from bench.discovery import _register_request
from bench.environment import databases
from bench.stats import closed_loop
from hive_common.procstack import ProcessStack
from neuralhive.registry.v1 import registry_service_pb2_grpc as rpb_grpc

STATEMENT = """
EXPLAIN (ANALYZE, BUFFERS, COSTS OFF)
SELECT * FROM workers
WHERE namespace = %(namespace)s AND NOT draining AND last_heartbeat_at >= %(healthy_since)s
  AND in_flight < max_concurrent AND capabilities @> %(capabilities)s {labels}
ORDER BY rank_key DESC, (tiebreak # %(seed)s) LIMIT %(window)s
"""


async def register(target: str, workers: int) -> None:
    metadata = (("authorization", f"Bearer {stack.REGISTRATION_SECRET}"),)
    async with grpc.aio.insecure_channel(target) as channel:
        stub: rpb_grpc.ServiceRegistryAsyncStub = rpb_grpc.ServiceRegistryStub(channel)

        async def call(i: int) -> None:
            await stub.Register(_register_request(i), metadata=metadata, timeout=60)

        result = await closed_loop(call, concurrency=32, total=workers)
        if result.errors:
            raise RuntimeError(result.first_error)


def explain(dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        namespace = conn.execute("SELECT namespace FROM workers LIMIT 1").fetchone()
        params = {
            "namespace": namespace[0] if namespace else "",
            "healthy_since": datetime.now(UTC) - timedelta(hours=1),
            "seed": 12345,
            "window": 20,
        }
        for name, capabilities, labels in (
            ("capability every worker has", ["python"], None),
            ("rare capability + label", ["python", "gpu"], {"zone": "b"}),
        ):
            query = STATEMENT.format(labels="AND labels @> %(labels)s" if labels else "")
            rows = conn.execute(
                query, {**params, "capabilities": capabilities, "labels": Jsonb(labels or {})}
            ).fetchall()
            print(f"--- {name}")
            print("\n".join(r[0] for r in rows))


PREPARED = """
PREPARE discover_{name}(text, timestamptz, text[], jsonb, bigint, int) AS
SELECT * FROM workers
WHERE namespace = $1 AND NOT draining AND last_heartbeat_at >= $2
  AND in_flight < max_concurrent AND capabilities @> $3 {labels}
ORDER BY rank_key DESC, (tiebreak # $5) LIMIT $6
"""


def explain_prepared(dsn: str) -> None:
    """psycopg prepares a statement after 5 executions; PostgreSQL may then switch to a
    generic plan (chosen without the parameter values)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        namespace = conn.execute("SELECT namespace FROM workers LIMIT 1").fetchone()
        ns = namespace[0] if namespace else ""
        for name, capabilities, labels in (
            ("common", ["python"], None),
            ("rare", ["python", "gpu"], {"zone": "b"}),
        ):
            conn.execute(PREPARED.format(name=name, labels="AND labels @> $4" if labels else ""))
            args = (
                ns,
                datetime.now(UTC) - timedelta(hours=1),
                capabilities,
                Jsonb(labels or {}),
                12345,
                20,
            )
            # EXECUTE takes literals: bind on the client side.
            cur = psycopg.ClientCursor(conn)
            for _ in range(6):
                cur.execute(f"EXECUTE discover_{name}(%s, %s, %s, %s, %s, %s)", args)
            rows = cur.execute(
                f"EXPLAIN (ANALYZE, COSTS OFF) EXECUTE discover_{name}(%s, %s, %s, %s, %s, %s)",
                args,
            ).fetchall()
            print(f"--- prepared, 7th execution: {name}")
            print("\n".join(r[0] for r in rows))


def main() -> None:
    parser = argparse.ArgumentParser(description="EXPLAIN the registry's discovery query")
    parser.add_argument("--workers", type=int, default=10_000)
    args = parser.parse_args()
    with databases(durable=True) as dbs, tempfile.TemporaryDirectory() as logs:
        dsn = dbs.fresh_database("bench_discovery_plan")
        registry = stack.registry(
            name="service-registry",
            postgres_dsn=dsn,
            log_level="WARNING",
            heartbeat_interval_seconds=600,
        )
        with ProcessStack([registry.spec], log_dir=Path(logs)) as procs:
            procs.start_all()
            asyncio.run(register(registry.endpoint.grpc_target, args.workers))
            print("=== right after registration (statistics as autovacuum left them)")
            explain(dsn)
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("ANALYZE workers")
            print("=== after ANALYZE workers")
            explain(dsn)
            explain_prepared(dsn)


if __name__ == "__main__":
    main()
