"""Advisory lock keys of the registry's database."""

import hashlib

EVENTS_LOCK_KEY = int.from_bytes(
    hashlib.sha256(b"service_registry.worker_events").digest()[:8], "big", signed=True
)
"""Held (per transaction) by every writer of worker_events, so commits follow sequence order."""
