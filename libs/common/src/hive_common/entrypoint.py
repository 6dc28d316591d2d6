"""The console-script body of the services: settings, logging, serve, exit status.

What an operator gets wrong at start-up (an invalid setting, a port in use, a database
that does not answer) ends the process with one clear message and a non-zero status, not
a traceback; a setting's value is never echoed (it may be a secret).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from pydantic import ValidationError

from hive_common.config import HiveSettings, invalid_settings_message
from hive_common.errors import HiveError, describe_error
from hive_common.logging import configure_logging, get_logger
from hive_common.runtime import ServerStoppedUnexpectedly

S = TypeVar("S", bound=HiveSettings)

EXIT_FAILED = 1
"""Start-up failed (a dependency down, a port in use) or a server died."""
EXIT_INVALID_SETTINGS = 2
EXIT_INTERRUPTED = 130
"""Ctrl-C before the service was up (after, it is a graceful stop: 0)."""


def run_service(
    settings_type: type[S],
    serve: Callable[[S, Any], Coroutine[Any, Any, None]],
    *,
    program: str,
) -> int:
    """Build ``settings_type`` from the environment, configure logging, warn about an
    insecure JWT secret, then run ``serve(settings, logger)``; the exit status."""
    try:
        settings = settings_type()
    except ValidationError as exc:
        prefix = settings_type.model_config.get("env_prefix", "")
        print(invalid_settings_message(program, exc, prefix), file=sys.stderr)
        return EXIT_INVALID_SETTINGS
    configure_logging(level=settings.log_level, fmt=settings.log_format)
    logger = get_logger(program.replace("-", "_"))  # the package's logger name
    settings.warn_if_insecure(logger)
    try:
        asyncio.run(serve(settings, logger))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except (HiveError, OSError, ServerStoppedUnexpectedly) as exc:
        logger.error("service failed", error=describe_error(exc))
        return EXIT_FAILED
    return 0
