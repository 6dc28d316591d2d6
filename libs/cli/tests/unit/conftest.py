"""In-process runs of ``hive`` against an ``httpx.MockTransport`` (no sockets)."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from hive_cli.cli import main


@dataclass
class Run:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


@dataclass
class FakeServices:
    """Answers by (method, path); records every request."""

    routes: dict[tuple[str, str], Callable[[httpx.Request], httpx.Response]] = field(
        default_factory=dict
    )
    requests: list[httpx.Request] = field(default_factory=list)

    def on(self, method: str, path: str, status: int = 200, body: Any = None) -> None:
        self.routes[(method, path)] = lambda _req: httpx.Response(status, json=body)

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        route = self.routes.get((request.method, request.url.path))
        if route is None:
            return httpx.Response(
                404, json={"error": {"code": "NOT_FOUND", "message": "no route", "details": {}}}
            )
        return route(request)

    def run(
        self, *argv: str, env: Mapping[str, str] | None = None, stdin: bytes | None = None
    ) -> Run:
        out, err = io.StringIO(), io.StringIO()
        code = main(
            list(argv),
            stdout=out,
            stderr=err,
            stdin=io.BytesIO(stdin) if stdin is not None else io.BytesIO(b""),
            env=env or {},
            transport=httpx.MockTransport(self.handler),
        )
        return Run(code, out.getvalue(), err.getvalue())


def error_body(code: str, message: str, **details: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details}}
