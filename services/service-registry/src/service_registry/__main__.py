"""``service-registry`` console script: configured from ``HIVE_REGISTRY_*`` variables."""

from __future__ import annotations

import sys
from typing import Any

from hive_common.entrypoint import run_service
from hive_common.heap import freeze_heap
from service_registry.app import build_app
from service_registry.config import RegistrySettings


async def _serve(settings: RegistrySettings, logger: Any) -> None:
    if settings.registration_secret is None:
        logger.warning(
            "no registration secret configured",
            detail="only holders of the service token can register workers; set "
            "HIVE_REGISTRY_REGISTRATION_SECRET to let workers join with it",
        )
    app = await build_app(settings)
    freeze_heap()  # start-up objects are never garbage: keep full GCs short
    await app.run_until_signal()


def main() -> int:
    return run_service(RegistrySettings, _serve, program="service-registry")


if __name__ == "__main__":
    sys.exit(main())
