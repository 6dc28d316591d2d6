"""``orchestrator-dynamic``: run the orchestrator configured from ``HIVE_ORCHESTRATOR_*``."""

from __future__ import annotations

import asyncio

from hive_common.heap import freeze_heap
from hive_common.logging import configure_logging, get_logger
from orchestrator_dynamic.app import build_app
from orchestrator_dynamic.config import OrchestratorSettings


async def _run() -> None:
    settings = OrchestratorSettings()
    configure_logging(level=settings.log_level, fmt=settings.log_format)
    logger = get_logger("orchestrator_dynamic")
    settings.warn_if_insecure(logger)
    if settings.api_token is None:
        logger.warning(
            "HTTP_API_OPEN",
            detail="no HIVE_ORCHESTRATOR_API_TOKEN: anyone who reaches the port can submit plans",
        )
    app = await build_app(settings)
    freeze_heap()  # start-up objects are never garbage: keep full GCs short
    await app.run_until_signal()


def main() -> None:
    asyncio.run(_run())


if __name__ == "__main__":
    main()
