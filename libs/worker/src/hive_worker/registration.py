"""Registering one worker process: its instance id and the registry's "name in use" refusal.

The registry refuses a second live process under a name another live process holds
(``ALREADY_EXISTS``, reason ``WORKER_NAME_IN_USE``): the two would share one worker id and
both run every assignment. It recognises "the same process again" by the
``instance_id`` a process sends with every Register.
"""

from __future__ import annotations

import uuid

from hive_common.errors import WORKER_NAME_IN_USE, AlreadyExists, HiveError

DEFAULT_UNHEALTHY_WINDOW_SECONDS = 15.0
"""The registry's default (5 s x 3 missed heartbeats), if a refusal does not say."""


def new_instance_id() -> str:
    """A random id for one worker process (what RegisterRequest.instance_id expects)."""
    return uuid.uuid4().hex


def is_name_in_use(exc: HiveError) -> bool:
    """True for the registry's refusal of a name another live worker process holds."""
    return isinstance(exc, AlreadyExists) and exc.details.get("reason") == WORKER_NAME_IN_USE


def _seconds(exc: HiveError, key: str, default: float) -> float:
    try:
        value = float(exc.details.get(key, default))
    except (TypeError, ValueError):
        return default
    return value if value >= 0 else default


def unhealthy_window(exc: HiveError) -> float:
    """How long after its last heartbeat the registry frees a silent holder's name."""
    return _seconds(exc, "unhealthy_after_seconds", DEFAULT_UNHEALTHY_WINDOW_SECONDS)


def retry_after(exc: HiveError) -> float:
    """When the holder's registration lapses, should it send no further heartbeat."""
    return _seconds(exc, "retry_after_seconds", 1.0)
