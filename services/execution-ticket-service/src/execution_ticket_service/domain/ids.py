"""UUID strings: random (version 4) ones many at a time, and one canonical form.

One ``os.urandom`` call and one hex conversion for a whole batch cost a fraction of
``str(uuid.uuid4())`` per ticket (a syscall and a ``UUID`` object each).
"""

from __future__ import annotations

import os
import uuid


def canonical_if_uuid(value: str) -> str:
    """The canonical (lower-case, hyphenated) form of a UUID; any other string as it is.

    For ids that are UUIDs when they come from Hive (ticket ids, the registry's worker
    ids) but are only checked where they are used: ``A1B2...`` and ``a1b2...`` must be
    one worker to its assignments, watches and listings."""
    try:
        return str(uuid.UUID(value))
    except ValueError:
        return value


def new_uuid4_strings(count: int) -> list[str]:
    """``count`` canonical lowercase UUIDv4 strings from the OS random source."""
    raw = bytearray(os.urandom(16 * count))
    # RFC 4122: version 4 in the high nibble of byte 6, variant 10xx in byte 8.
    raw[6::16] = bytes((b & 0x0F) | 0x40 for b in raw[6::16])
    raw[8::16] = bytes((b & 0x3F) | 0x80 for b in raw[8::16])
    h = raw.hex()
    return [
        f"{h[i : i + 8]}-{h[i + 8 : i + 12]}-{h[i + 12 : i + 16]}-"
        f"{h[i + 16 : i + 20]}-{h[i + 20 : i + 32]}"
        for i in range(0, 32 * count, 32)
    ]
