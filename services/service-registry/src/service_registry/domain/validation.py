"""Input validation: every problem is reported at once, with the field it concerns."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from hive_common.errors import FieldViolation, InvalidArgument, not_shown
from hive_common.namespaces import DEFAULT_NAMESPACE, NAMESPACE_RE, NAMESPACE_RULE
from hive_common.text import shown
from hive_common.tokens import decode_token, encode_token
from service_registry.domain.models import (
    DiscoveryQuery,
    HeartbeatUpdate,
    ListCursor,
    ListQuery,
    RegistrationSpec,
    WorkerStatus,
)

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
CAPABILITY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/+-]{0,63}")
_CAPABILITY_RULE = (
    "must be 1-64 characters: letters, digits and . _ : / + - (starting with a letter or digit)"
)
LABEL_KEY_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._/-]{0,61}[A-Za-z0-9])?")
MAX_CAPABILITIES = 64
MAX_LABELS = 32
MAX_LABEL_VALUE = 256
MAX_VERSION = 64
MAX_CONCURRENT_LIMIT = 10_000
MAX_UINT63 = 2**63 - 1  # counters are stored as PostgreSQL bigint
# Violations travel in a gRPC trailer (grpc-status-details-bin), which clients refuse
# beyond 8-16 KiB of metadata: echoed input is shortened (hive_common.text.shown) and the
# list is bounded.
MAX_REPORTED_VIOLATIONS = 20
NUL = "\x00"
_NUL_MESSAGE = "must not contain NUL (\\u0000) characters"


@dataclass(frozen=True, slots=True)
class Limits:
    """Defaults and caps of result sizes; larger requests are capped, not refused."""

    default_max_results: int = 10
    max_results_cap: int = 100
    default_page_size: int = 50
    page_size_cap: int = 500


def bounded(violations: list[FieldViolation]) -> list[FieldViolation]:
    """The first :data:`MAX_REPORTED_VIOLATIONS` violations, then one counting the rest."""
    if len(violations) <= MAX_REPORTED_VIOLATIONS:
        return violations
    rest = len(violations) - MAX_REPORTED_VIOLATIONS
    return [
        *violations[:MAX_REPORTED_VIOLATIONS],
        not_shown(rest),
    ]


class _Violations:
    def __init__(self) -> None:
        self.items: list[FieldViolation] = []

    def add(self, field: str, description: str) -> None:
        self.items.append(FieldViolation(field=field, description=description))

    def raise_if_any(self, message: str) -> None:
        if self.items:
            raise InvalidArgument(message, violations=bounded(self.items))


def _no_nul(value: str, field: str, v: _Violations) -> None:
    """PostgreSQL text and jsonb cannot store NUL: refuse it as bad input, not a DB error."""
    if NUL in value:
        v.add(field, _NUL_MESSAGE)


def _namespace(value: str, field: str, v: _Violations) -> str:
    if not value:
        return DEFAULT_NAMESPACE
    if not NAMESPACE_RE.fullmatch(value):
        v.add(field, NAMESPACE_RULE)
    return value


def _capabilities(
    values: Iterable[str], field: str, v: _Violations, *, required: bool
) -> tuple[str, ...]:
    values = list(values)
    if required and not values:
        v.add(field, "at least one capability is required")
    if len(values) > MAX_CAPABILITIES:
        v.add(field, f"at most {MAX_CAPABILITIES} capabilities")
    for i, cap in enumerate(values):
        if not CAPABILITY_RE.fullmatch(cap):
            v.add(
                f"{field}[{i}]",
                _CAPABILITY_RULE,
            )
    return tuple(sorted(set(values)))


def _label(key: str, value: str, field: str, v: _Violations) -> None:
    if not LABEL_KEY_RE.fullmatch(key):
        v.add(
            field,
            "label key must be 1-63 letters, digits, '.', '_', '/' or '-', "
            "starting and ending with a letter or digit",
        )
    if len(value) > MAX_LABEL_VALUE:
        v.add(field, f"label value longer than {MAX_LABEL_VALUE} characters")
    else:
        _no_nul(value, field, v)


def _labels(values: Mapping[str, str], field: str, v: _Violations) -> dict[str, str]:
    """A protobuf map: each entry is named by its (shortened) key, ``labels[zone]``."""
    if len(values) > MAX_LABELS:
        v.add(field, f"at most {MAX_LABELS} labels")
    for key, value in values.items():
        _label(key, value, f"{field}[{shown(key)}]", v)
    return dict(values)


def _selector(values: Sequence[str], field: str, v: _Violations) -> dict[str, str]:
    """Repeated ``key=value`` selectors (HTTP), each named by its position (``label[0]``);
    a key given twice is refused: a selector is a map, and neither value may win silently."""
    if len(values) > MAX_LABELS:
        v.add(field, f"at most {MAX_LABELS} labels")
    labels: dict[str, str] = {}
    for i, item in enumerate(values):
        key, sep, value = item.partition("=")
        if not sep:
            v.add(f"{field}[{i}]", "must be key=value")
            continue
        _label(key, value, f"{field}[{i}]", v)
        if key in labels:
            v.add(f"{field}[{i}]", f"label key {shown(key)!r} is given more than once")
        labels[key] = value
    return labels


def _worker_id(value: str, field: str, v: _Violations) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        v.add(field, "must be a UUID" if value else "is required")
        return uuid.UUID(int=0)


def parse_worker_id(value: str, field: str = "worker_id") -> uuid.UUID:
    v = _Violations()
    worker_id = _worker_id(value, field, v)
    v.raise_if_any("invalid worker_id")
    return worker_id


def validate_registration(
    *,
    name: str,
    namespace: str,
    capabilities: Iterable[str],
    labels: Mapping[str, str],
    max_concurrent: int,
    version: str,
    instance_id: str = "",
) -> RegistrationSpec:
    v = _Violations()
    if not name:
        v.add("name", "is required")
    elif not NAME_RE.fullmatch(name):
        v.add("name", "must be 1-128 letters, digits, '.', '_', ':' or '-', starting alphanumeric")
    spec = RegistrationSpec(
        name=name,
        namespace=_namespace(namespace, "namespace", v),
        capabilities=_capabilities(capabilities, "capabilities", v, required=True),
        labels=_labels(labels, "labels", v),
        max_concurrent=max_concurrent,
        version=version,
        instance_id=instance_id,
    )
    if instance_id and not NAME_RE.fullmatch(instance_id):
        v.add(
            "instance_id",
            "must be empty or 1-128 letters, digits, '.', '_', ':' or '-', starting alphanumeric",
        )
    if not 1 <= max_concurrent <= MAX_CONCURRENT_LIMIT:
        v.add("max_concurrent", f"must be between 1 and {MAX_CONCURRENT_LIMIT}")
    if len(version) > MAX_VERSION:
        v.add("version", f"at most {MAX_VERSION} characters")
    else:
        _no_nul(version, "version", v)
    v.raise_if_any("invalid registration")
    return spec


def validate_heartbeat(
    *,
    worker_id: str,
    in_flight: int,
    succeeded_total: int | None,
    failed_total: int | None,
    draining: bool,
) -> HeartbeatUpdate:
    v = _Violations()
    parsed = _worker_id(worker_id, "worker_id", v)
    if in_flight < 0:
        v.add("in_flight", "must not be negative")
    for field, total in (("succeeded_total", succeeded_total), ("failed_total", failed_total)):
        if total is not None and not 0 <= total <= MAX_UINT63:
            v.add(field, f"must be between 0 and {MAX_UINT63}")
    v.raise_if_any("invalid heartbeat")
    return HeartbeatUpdate(
        worker_id=parsed,
        in_flight=in_flight,
        succeeded_total=succeeded_total,
        failed_total=failed_total,
        draining=draining,
    )


def _capped(value: int, field: str, default: int, cap: int, v: _Violations) -> int:
    if value < 0:
        v.add(field, "must not be negative")
        return default
    if value == 0:
        return default
    return min(value, cap)


def validate_discovery(
    *,
    required_capabilities: Iterable[str],
    label_selector: Mapping[str, str],
    namespace: str,
    max_results: int,
    limits: Limits,
    include_full: bool = False,
) -> DiscoveryQuery:
    v = _Violations()
    query = DiscoveryQuery(
        required_capabilities=_capabilities(
            required_capabilities, "required_capabilities", v, required=False
        ),
        label_selector=_labels(label_selector, "label_selector", v),
        namespace=_namespace(namespace, "namespace", v),
        max_results=_capped(
            max_results, "max_results", limits.default_max_results, limits.max_results_cap, v
        ),
        include_full=include_full,
    )
    v.raise_if_any("invalid discovery request")
    return query


def encode_cursor(cursor: ListCursor) -> str:
    return encode_token([cursor.namespace, cursor.name])


def _decode_cursor(token: str) -> ListCursor | None:
    value = decode_token(token)
    # A token names a stored worker, so its parts follow the registration rules; anything
    # else (a NUL, a lone surrogate) was forged and must not reach the database.
    if (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(part, str) for part in value)
        and NAMESPACE_RE.fullmatch(value[0])
        and NAME_RE.fullmatch(value[1])
    ):
        return ListCursor(namespace=value[0], name=value[1])
    return None


def validate_list(
    *,
    namespace: str,
    statuses: Iterable[WorkerStatus],
    capability: str,
    page_size: int,
    page_token: str,
    limits: Limits,
    labels: Sequence[str] = (),
    field_prefix: str = "",
    status_violations: Sequence[FieldViolation] = (),
) -> ListQuery:
    """Empty namespace means every namespace (an operator's view), unlike discovery.

    ``labels`` (HTTP only) are the repeated ``key=value`` selectors; ``field_prefix``
    names the fields as the transport spells them (``query.`` for HTTP);
    ``status_violations``: statuses the transport could not read, reported with the rest.
    """
    v = _Violations()
    v.items.extend(status_violations)
    if namespace and not NAMESPACE_RE.fullmatch(namespace):
        v.add(
            f"{field_prefix}namespace",
            NAMESPACE_RULE,
        )
    if capability and not CAPABILITY_RE.fullmatch(capability):
        v.add(
            f"{field_prefix}capability",
            _CAPABILITY_RULE,
        )
    after = None
    if page_token:
        after = _decode_cursor(page_token)
        if after is None:
            v.add(f"{field_prefix}page_token", "is not a token returned by ListWorkers")
    query = ListQuery(
        namespace=namespace or None,
        statuses=frozenset(statuses),
        capability=capability or None,
        page_size=_capped(
            page_size,
            f"{field_prefix}page_size",
            limits.default_page_size,
            limits.page_size_cap,
            v,
        ),
        after=after,
        label_selector=_selector(labels, f"{field_prefix}label", v),
    )
    v.raise_if_any("invalid list request")
    return query


def validate_watch(*, namespace: str) -> str | None:
    """The namespace to watch; empty means every namespace."""
    v = _Violations()
    if namespace and not NAMESPACE_RE.fullmatch(namespace):
        v.add("namespace", NAMESPACE_RULE)
    v.raise_if_any("invalid watch request")
    return namespace or None
