"""Reading a service's OpenAPI document in its tests (every service documents its routes
the same way: hive_common.http)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# What every 4xx / 5xx answer of every route carries.
ERROR_BODY = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}


def operations(document: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """The API's operations by (method, path), without the probes and metrics."""
    return {
        (method, path): operation
        for path, methods in document["paths"].items()
        if path.startswith("/api/")
        for method, operation in methods.items()
    }


def resolve(document: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """``schema``, or the component it refers to."""
    if "$ref" in schema:
        resolved: dict[str, Any] = document["components"]["schemas"][
            schema["$ref"].rsplit("/", 1)[1]
        ]
        return resolved
    return schema


def assert_errors_have_the_error_body(found: Mapping[Any, dict[str, Any]]) -> None:
    """Every 4xx / 5xx answer of ``found`` (operations by any key) documents the error body."""
    for key, operation in found.items():
        for status, answer in operation["responses"].items():
            if status[0] in "45":
                assert answer["content"] == ERROR_BODY, (key, status)


__all__ = ["ERROR_BODY", "assert_errors_have_the_error_body", "operations", "resolve"]
