"""``execution-ticket-service``: run the service configured from ``HIVE_TICKETS_*``."""

from __future__ import annotations

import asyncio

from execution_ticket_service.app import build_service
from execution_ticket_service.config import TicketSettings
from hive_common.heap import freeze_heap
from hive_common.logging import configure_logging, get_logger


async def _run() -> None:
    settings = TicketSettings()
    configure_logging(level=settings.log_level, fmt=settings.log_format)
    settings.warn_if_insecure(get_logger("execution_ticket_service"))
    service = await build_service(settings)
    freeze_heap()  # start-up objects are never garbage: keep full GCs short
    await service.run_until_signal()


def main() -> None:
    asyncio.run(_run())


if __name__ == "__main__":
    main()
