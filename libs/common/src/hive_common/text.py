"""Text made safe to show: for a terminal, a log line, a grep."""

from __future__ import annotations

import re

# Control characters (C0, newline and tab included, DEL, C1) and the bidirectional
# overrides: shown raw they drive a terminal (clear it, set its title), forge lines of
# output, reorder what is read, or (a NUL) make grep take a whole file for binary.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _escaped(match: re.Match[str]) -> str:
    return match.group().encode("unicode_escape").decode()


def escape_controls(text: str) -> str:
    """``text`` for one line: every unsafe character as its escape (``\\x1b``, ``\\u202e``)."""
    return _UNSAFE.sub(_escaped, text) if _UNSAFE.search(text) else text


MAX_ECHOED = 64
"""How much of a request's value an error message echoes: errors travel in gRPC trailers,
which clients refuse beyond 8-16 KiB of metadata, and in HTTP bodies that should not be
a copy of whatever was sent."""


def shown(value: str) -> str:
    """``value`` as echoed in an error: at most :data:`MAX_ECHOED` characters."""
    return value if len(value) <= MAX_ECHOED else value[:MAX_ECHOED] + "\u2026"


__all__ = ["MAX_ECHOED", "escape_controls", "shown"]
