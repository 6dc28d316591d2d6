"""A small synchronous client for the three services' HTTP APIs.

Every failure surfaces as one of two exceptions, :class:`ApiError` (the service answered
with an error) or :class:`ServiceUnreachable` (no answer), so the command layer maps them
to exit codes in one place.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx

from hive_cli.exit_codes import ExitCode, exit_code_for_status

JsonObject = dict[str, Any]
QueryValue = str | int | bool | Sequence[str]
# Requests that change nothing: one that timed out can simply be sent again.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass
class ApiError(Exception):
    """A service answered with an error; ``code``/``message``/``details`` come from its
    ``{"error": {...}}`` body (or are synthesised when the body has another shape)."""

    service: str
    status: int
    code: str
    message: str
    details: JsonObject = field(default_factory=dict)
    url: str = ""

    def __str__(self) -> str:
        return f"{self.service}: {self.code} ({self.status}): {self.message}"

    @property
    def from_another_service(self) -> bool:
        """The answer is not what this service sends: not its JSON error shape, not JSON
        at all, or a 404 for the route itself (a URL of another service, or not Hive)."""
        return (
            self.code.startswith("HTTP_")
            or self.code == "BAD_RESPONSE"
            or (self.status == 404 and self.message == "Not Found")
        )

    @property
    def exit_code(self) -> ExitCode:
        """The process exit code this error maps to."""
        return exit_code_for_status(self.status)

    @property
    def field_violations(self) -> list[tuple[str, str]]:
        """``(json path, description)`` pairs from ``details.field_violations``."""
        raw = self.details.get("field_violations")
        if not isinstance(raw, list):
            return []
        pairs = []
        for item in raw:
            if isinstance(item, Mapping):
                pairs.append((str(item.get("field", "")), str(item.get("description", ""))))
        return pairs


@dataclass
class ServiceUnreachable(Exception):
    """No HTTP answer: connection refused, DNS failure, timeout."""

    service: str
    url: str
    reason: str
    hint: str = "is the service running? (see --orchestrator/--tickets/--registry)"
    # The request was sent and the answer did not come in time: it may have been carried out.
    sent: bool = False

    def __str__(self) -> str:
        if self.sent:
            return f"{self.service} at {self.url} did not answer in time: {self.reason}"
        return f"{self.service} at {self.url} is unreachable: {self.reason}"


def error_from_response(service: str, response: httpx.Response) -> ApiError:
    """Decode the shared error body; any other body becomes a generic error."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, Mapping) and isinstance(body.get("error"), Mapping):
        error = body["error"]
        details = error.get("details")
        return ApiError(
            service=service,
            status=response.status_code,
            code=str(error.get("code") or f"HTTP_{response.status_code}"),
            message=str(error.get("message") or response.reason_phrase),
            details=dict(details) if isinstance(details, Mapping) else {},
        )
    text = response.text.strip()
    return ApiError(
        service=service,
        status=response.status_code,
        code=f"HTTP_{response.status_code}",
        message=(text[:500] if text else response.reason_phrase) or "no message",
    )


def _segment(value: str) -> str:
    """``value`` as one path segment: ``/`` is escaped, and so are the dot segments ``.``
    and ``..``, which the URL would otherwise resolve (``/tickets/..`` is ``/``), so no id
    can address another route."""
    if value in (".", ".."):
        return value.replace(".", "%2E")
    return quote(value, safe="")


def _timed_out(exc: httpx.TimeoutException) -> str:
    """ "timed out", with what httpx adds when it adds something ("timed out (timed out)")."""
    said = str(exc)
    return "timed out" if said in ("", "timed out") else f"timed out ({said})"


class ServiceClient:
    """One service's HTTP API: base URL, bearer token, JSON in and out."""

    def __init__(
        self,
        *,
        name: str,
        base_url: str,
        token: Callable[[], str | None],
        timeout: float,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/")
        self._token = token
        self._http = httpx.Client(
            base_url=self.base_url,
            timeout=timeout,
            transport=transport,
            headers={"accept": "application/json", "user-agent": "hive-cli"},
        )

    def close(self) -> None:
        """Release the connection pool."""
        self._http.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, QueryValue] | None = None,
        content: bytes | None = None,
    ) -> JsonObject:
        """Send one request; the decoded JSON object on 2xx, else :class:`ApiError`."""
        headers = {}
        token = self._token()
        if token:
            headers["authorization"] = f"Bearer {token}"
        if content is not None:
            headers["content-type"] = "application/json"
        query = _query(params or {})
        try:
            response = self._http.request(
                method, path, params=query, content=content, headers=headers
            )
        except (httpx.ReadTimeout, httpx.WriteTimeout) as exc:
            hint = "--request-timeout waits longer"
            if method not in SAFE_METHODS:
                hint = (
                    "the request may have been carried out all the same (check before sending "
                    f"it again); {hint}"
                )
            raise ServiceUnreachable(
                self.name, self.base_url, _timed_out(exc), hint=hint, sent=True
            ) from exc
        except httpx.TimeoutException as exc:
            raise ServiceUnreachable(self.name, self.base_url, _timed_out(exc)) from exc
        except httpx.RemoteProtocolError as exc:
            raise ServiceUnreachable(
                self.name,
                self.base_url,
                f"it answered, but not in HTTP/1.1 ({exc})",
                hint=f"is this the {self.name}'s HTTP URL, not its gRPC port? (--{self.name})",
            ) from exc
        except httpx.TransportError as exc:
            raise ServiceUnreachable(
                self.name, self.base_url, str(exc) or type(exc).__name__
            ) from exc
        if response.status_code >= 400:
            error = error_from_response(self.name, response)
            error.url = self.base_url
            raise error
        try:
            body = response.json()
        except ValueError as exc:
            raise ApiError(
                self.name,
                response.status_code,
                "BAD_RESPONSE",
                f"answer to {method} {path} is not JSON",
                url=self.base_url,
            ) from exc
        if not isinstance(body, dict):
            raise ApiError(
                self.name,
                response.status_code,
                "BAD_RESPONSE",
                f"answer to {method} {path} is not a JSON object",
                url=self.base_url,
            )
        return body


QueryPair = tuple[str, str | int | float | bool | None]


def _query(params: Mapping[str, QueryValue]) -> list[QueryPair]:
    """Query pairs, dropping empty values; lists repeat their key."""
    pairs: list[QueryPair] = []
    for key, value in params.items():
        if isinstance(value, bool):
            if value:
                pairs.append((key, "true"))
        elif isinstance(value, int | str):
            if value:
                pairs.append((key, value))
        else:
            pairs.extend((key, item) for item in value if item)
    return pairs


class HiveApi:
    """The orchestrator, ticket service and registry HTTP APIs behind one object."""

    def __init__(
        self,
        *,
        orchestrator: ServiceClient,
        tickets: ServiceClient,
        registry: ServiceClient,
    ) -> None:
        self.orchestrator = orchestrator
        self.tickets = tickets
        self.registry = registry

    def close(self) -> None:
        """Close every connection pool."""
        for client in (self.orchestrator, self.tickets, self.registry):
            client.close()

    def __enter__(self) -> HiveApi:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Plans (orchestrator).
    def submit_plan(self, body: bytes, *, strict: bool) -> JsonObject:
        """POST /api/v1/plans with the plan file's bytes, untouched."""
        return self.orchestrator.request(
            "POST", "/api/v1/plans", params={"strict": strict}, content=body
        )

    def get_plan(self, plan_id: str) -> JsonObject:
        return self.orchestrator.request("GET", f"/api/v1/plans/{_segment(plan_id)}")

    def list_plans(
        self, *, page_size: int = 0, page_token: str = "", statuses: Sequence[str] = ()
    ) -> JsonObject:
        return self.orchestrator.request(
            "GET",
            "/api/v1/plans",
            params={"page_size": page_size, "page_token": page_token, "status": statuses},
        )

    def cancel_plan(self, plan_id: str) -> JsonObject:
        return self.orchestrator.request("POST", f"/api/v1/plans/{_segment(plan_id)}/cancel")

    def explain_plan(self, plan_id: str, *, all_tasks: bool = False) -> JsonObject:
        return self.orchestrator.request(
            "GET", f"/api/v1/plans/{_segment(plan_id)}/explain", params={"all": all_tasks}
        )

    def explain_task(self, plan_id: str, task_id: str) -> JsonObject:
        return self.orchestrator.request(
            "GET", f"/api/v1/plans/{_segment(plan_id)}/tasks/{_segment(task_id)}/explain"
        )

    # Tickets (ticket service).
    def list_tickets(
        self,
        *,
        plan_id: str = "",
        statuses: Sequence[str] = (),
        worker_id: str = "",
        page_size: int = 0,
        page_token: str = "",
    ) -> JsonObject:
        return self.tickets.request(
            "GET",
            "/api/v1/tickets",
            params={
                "plan_id": plan_id,
                "status": statuses,
                "worker_id": worker_id,
                "page_size": page_size,
                "page_token": page_token,
            },
        )

    def get_ticket(self, ticket_id: str) -> JsonObject:
        """One ticket with its parameters, result and error."""
        return self.tickets.request("GET", f"/api/v1/tickets/{_segment(ticket_id)}")

    def ticket_events(self, ticket_id: str) -> JsonObject:
        """A ticket's audit history, oldest first (``{"ticket_id", "events": [...]}``)."""
        return self.tickets.request("GET", f"/api/v1/tickets/{_segment(ticket_id)}/events")

    # Workers (registry).
    def get_worker(self, worker_id: str) -> JsonObject:
        """One registered worker."""
        return self.registry.request("GET", f"/api/v1/workers/{_segment(worker_id)}")

    def list_workers(
        self,
        *,
        capability: str = "",
        statuses: Sequence[str] = (),
        labels: Sequence[str] = (),
        namespace: str = "",
        page_size: int = 0,
        page_token: str = "",
    ) -> JsonObject:
        return self.registry.request(
            "GET",
            "/api/v1/workers",
            params={
                "capability": capability,
                "status": statuses,
                "label": labels,
                "namespace": namespace,
                "page_size": page_size,
                "page_token": page_token,
            },
        )
