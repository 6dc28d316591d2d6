"""``orchestrator-dynamic``: run the orchestrator configured from ``HIVE_ORCHESTRATOR_*``."""

from __future__ import annotations

import sys
from typing import Any

from hive_common.entrypoint import run_service
from hive_common.heap import freeze_heap
from orchestrator_dynamic.app import build_app
from orchestrator_dynamic.config import OrchestratorSettings


async def _serve(settings: OrchestratorSettings, logger: Any) -> None:
    if settings.api_token is None:
        logger.warning(
            "HTTP_API_OPEN",
            detail="no HIVE_ORCHESTRATOR_API_TOKEN: anyone who reaches the port can submit plans",
        )
    app = await build_app(settings)
    freeze_heap()  # start-up objects are never garbage: keep full GCs short
    await app.run_until_signal()


def main() -> int:
    return run_service(OrchestratorSettings, _serve, program="orchestrator-dynamic")


if __name__ == "__main__":
    sys.exit(main())
