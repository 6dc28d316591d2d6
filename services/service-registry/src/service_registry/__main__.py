"""``service-registry`` console script: configured from ``HIVE_REGISTRY_*`` variables."""

from __future__ import annotations

import asyncio

from hive_common.heap import freeze_heap
from hive_common.logging import configure_logging, get_logger
from service_registry.app import build_app
from service_registry.config import RegistrySettings


async def _main() -> None:
    settings = RegistrySettings()
    configure_logging(level=settings.log_level, fmt=settings.log_format)
    logger = get_logger("service_registry")
    settings.warn_if_insecure(logger)
    if settings.registration_secret is None:
        logger.warning(
            "no registration secret configured",
            detail="only holders of the service token can register workers; set "
            "HIVE_REGISTRY_REGISTRATION_SECRET to let workers join with it",
        )
    app = await build_app(settings)
    freeze_heap()  # start-up objects are never garbage: keep full GCs short
    await app.run_until_signal()


def main() -> None:
    asyncio.run(_main())


if __name__ == "__main__":
    main()
