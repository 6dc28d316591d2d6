"""``execution-ticket-service``: run the service configured from ``HIVE_TICKETS_*``."""

from __future__ import annotations

import sys
from typing import Any

from execution_ticket_service.app import build_service
from execution_ticket_service.config import TicketSettings
from hive_common.entrypoint import run_service
from hive_common.heap import freeze_heap


async def _serve(settings: TicketSettings, logger: Any) -> None:
    service = await build_service(settings)
    freeze_heap()  # start-up objects are never garbage: keep full GCs short
    await service.run_until_signal()


def main() -> int:
    return run_service(TicketSettings, _serve, program="execution-ticket-service")


if __name__ == "__main__":
    sys.exit(main())
