"""Reading a request body's JSON text, stricter than ``json.loads``.

``decode_json`` refuses, with ``InvalidArgument`` and a JSON path where one can be told:
- text that is not JSON, and the non-standard ``NaN`` / ``Infinity`` constants;
- duplicate keys in an object (``json.loads`` keeps the last one silently, so a second
  ``"tasks"`` would drop the first list);
- integer literals too long to read (Python's ``int`` refuses more than 4300 digits) and
  number literals beyond the range of a double (``1e400``, which ``json.loads`` reads as
  infinity);
- nesting deeper than the decoder can follow, as a limit rather than a ``RecursionError``.
"""

from __future__ import annotations

import json
import math
from typing import Any

from hive_common.errors import FieldViolation, InvalidArgument
from hive_common.text import shown
from orchestrator_dynamic.domain.validation import child

# A body too deep for the decoder (about the interpreter's recursion limit) is refused as
# nesting more than this: true of it, and well beyond any valid plan (parameters nest at
# most 32 levels).
MAX_JSON_NESTING = 128
# More digits than this in an integer literal is refused (Python's own default limit).
MAX_INTEGER_DIGITS = 4300
# At most this many problems of one body are reported.
_MAX_REPORTED = 100


class _DuplicateKeys(dict[str, Any]):
    """An object in which ``keys`` appeared more than once (only made for those)."""

    def __init__(self, pairs: list[tuple[str, Any]], keys: list[str]) -> None:
        super().__init__(pairs)
        self.keys_repeated = keys


class _TooLong:
    """An integer literal with too many digits, in place of its value."""

    def __init__(self, digits: int) -> None:
        self.digits = digits


class _OutOfRange:
    """A number literal beyond the range of a double (``1e400``), in place of ``inf``."""

    def __init__(self, text: str) -> None:
        self.text = text


class _Decoding:
    """The hooks of one decode; ``suspect`` once a hook made a marker the walk must find."""

    def __init__(self) -> None:
        self.suspect = False

    def object_pairs(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        body = dict(pairs)
        if len(body) == len(pairs):
            return body
        self.suspect = True
        seen: set[str] = set()
        repeated: list[str] = []
        for key, _ in pairs:
            if key in seen and key not in repeated:
                repeated.append(key)
            seen.add(key)
        return _DuplicateKeys(pairs, repeated)

    def integer(self, text: str) -> int | _TooLong:
        digits = len(text) - (text[0] == "-")
        if digits > MAX_INTEGER_DIGITS:
            self.suspect = True
            return _TooLong(digits)
        return int(text)

    def number(self, text: str) -> float | _OutOfRange:
        value = float(text)
        if math.isinf(value):
            self.suspect = True
            return _OutOfRange(text)
        return value


def _no_constants(name: str) -> object:
    raise ValueError(f"{name} is not valid JSON")


def decode_json(text: str) -> object:
    """``text`` decoded as JSON; ``InvalidArgument`` with paths for what is refused."""
    decoding = _Decoding()
    try:
        value = json.loads(
            text,
            parse_constant=_no_constants,
            object_pairs_hook=decoding.object_pairs,
            parse_int=decoding.integer,
            parse_float=decoding.number,
        )
    except json.JSONDecodeError as exc:
        raise InvalidArgument(
            "request body is not valid JSON",
            violations=[FieldViolation("$", f"{exc.msg} at line {exc.lineno} column {exc.colno}")],
        ) from exc
    except RecursionError as exc:
        raise InvalidArgument(
            f"request body nests more than {MAX_JSON_NESTING} levels deep",
            violations=[FieldViolation("$", f"nests more than {MAX_JSON_NESTING} levels deep")],
        ) from exc
    except ValueError as exc:
        raise InvalidArgument(
            "request body is not valid JSON", violations=[FieldViolation("$", str(exc))]
        ) from exc
    if decoding.suspect:
        violations = _marked(value)
        if violations:
            first = violations[0]
            raise InvalidArgument(
                f"request body cannot be read: {first.field}: {first.description}",
                violations=violations,
            )
    return value


def _marked(value: object) -> list[FieldViolation]:
    """Every duplicate key and too large number in ``value``, in document order."""
    found: list[FieldViolation] = []
    # Iterative: the decoded value may nest as deep as the decoder could follow.
    stack: list[tuple[object, str]] = [(value, "$")]
    while stack and len(found) < _MAX_REPORTED:
        node, path = stack.pop()
        if isinstance(node, _TooLong):
            found.append(
                FieldViolation(path, f"number too large: an integer of {node.digits} digits")
            )
        elif isinstance(node, _OutOfRange):
            found.append(
                FieldViolation(
                    path, f"number too large: {shown(node.text)} is beyond the range of a double"
                )
            )
        elif isinstance(node, dict):
            if isinstance(node, _DuplicateKeys):
                for key in node.keys_repeated:
                    found.append(
                        FieldViolation(
                            child(path, key),
                            f"duplicate key {key!r}: a key may appear only once in an object",
                        )
                    )
            stack.extend((item, child(path, key)) for key, item in reversed(node.items()))
        elif isinstance(node, list):
            stack.extend((item, child(path, i)) for i, item in reversed(list(enumerate(node))))
    return found[:_MAX_REPORTED]
