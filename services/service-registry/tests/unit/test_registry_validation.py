"""Validation reports every bad field at once and normalises the rest."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from hive_common.errors import InvalidArgument
from service_registry.domain.models import ListCursor, ListQuery, WorkerStatus
from service_registry.domain.validation import (
    MAX_REPORTED_VIOLATIONS,
    Limits,
    encode_cursor,
    parse_worker_id,
    validate_discovery,
    validate_heartbeat,
    validate_list,
    validate_registration,
    validate_watch,
)

NUL = "\x00"

GOOD_REGISTRATION: dict[str, Any] = {
    "name": "host-1.example",
    "namespace": "",
    "capabilities": ["python", "gpu", "python"],
    "labels": {"zone": "eu-1", "tier/gpu": "yes"},
    "max_concurrent": 4,
    "version": "1.2.3",
}


def fields(exc: pytest.ExceptionInfo[InvalidArgument]) -> set[str]:
    return {v.field for v in exc.value.violations}


def _listing(**overrides: Any) -> ListQuery:
    """validate_list with every argument at its "nothing asked" value but ``overrides``."""
    values: dict[str, Any] = {
        "namespace": "",
        "statuses": [],
        "capability": "",
        "page_size": 0,
        "page_token": "",
        "limits": Limits(),
    }
    return validate_list(**(values | overrides))


def test_good_registration_is_normalised() -> None:
    spec = validate_registration(**GOOD_REGISTRATION)
    assert spec.namespace == "default"
    assert spec.capabilities == ("gpu", "python")


@pytest.mark.parametrize(
    ("overrides", "bad_fields"),
    [
        ({"name": ""}, {"name"}),
        ({"name": "has space"}, {"name"}),
        ({"name": "x" * 129}, {"name"}),
        ({"namespace": "Upper"}, {"namespace"}),
        ({"namespace": "-x"}, {"namespace"}),
        ({"capabilities": []}, {"capabilities"}),
        ({"capabilities": ["ok", "not ok", ""]}, {"capabilities[1]", "capabilities[2]"}),
        ({"capabilities": [f"c{i}" for i in range(65)]}, {"capabilities"}),
        ({"labels": {"bad key": "v"}}, {"labels[bad key]"}),
        ({"labels": {"k": "v" * 257}}, {"labels[k]"}),
        ({"labels": {f"k{i}": "v" for i in range(33)}}, {"labels"}),
        ({"max_concurrent": 0}, {"max_concurrent"}),
        ({"max_concurrent": -3}, {"max_concurrent"}),
        ({"max_concurrent": 10_001}, {"max_concurrent"}),
        ({"version": "v" * 65}, {"version"}),
        ({"version": f"v{NUL}1"}, {"version"}),
        ({"labels": {"k": f"a{NUL}b"}}, {"labels[k]"}),
        ({"labels": {f"k{NUL}": "v"}}, {f"labels[k{NUL}]"}),
        # A trailing newline (a pattern's "$" matches before one) is not part of a name.
        ({"name": "w1\n"}, {"name"}),
        ({"name": "x" * 128 + "\n"}, {"name"}),
        ({"namespace": "ns\n"}, {"namespace"}),
        ({"capabilities": ["cap\n"]}, {"capabilities[0]"}),
        ({"labels": {"zone\n": "eu"}}, {"labels[zone\n]"}),
        ({"instance_id": "i\n"}, {"instance_id"}),
        (
            {"name": "", "max_concurrent": 0, "namespace": "A"},
            {"name", "max_concurrent", "namespace"},
        ),
    ],
)
def test_bad_registration(overrides: dict[str, Any], bad_fields: set[str]) -> None:
    with pytest.raises(InvalidArgument) as exc:
        validate_registration(**{**GOOD_REGISTRATION, **overrides})
    assert fields(exc) == bad_fields


@pytest.mark.parametrize(
    ("args", "bad_fields"),
    [
        ({"worker_id": ""}, {"worker_id"}),
        ({"worker_id": "nope"}, {"worker_id"}),
        ({"in_flight": -1}, {"in_flight"}),
        ({"succeeded_total": 2**63}, {"succeeded_total"}),
        ({"failed_total": 2**64 - 1}, {"failed_total"}),
    ],
)
def test_bad_heartbeat(args: dict[str, Any], bad_fields: set[str]) -> None:
    base: dict[str, Any] = {
        "worker_id": "7d1d3a56-0a37-4d59-9f36-0c1c8e0f6a11",
        "in_flight": 0,
        "succeeded_total": None,
        "failed_total": None,
        "draining": False,
    }
    with pytest.raises(InvalidArgument) as exc:
        validate_heartbeat(**{**base, **args})
    assert fields(exc) == bad_fields


def test_parse_worker_id() -> None:
    with pytest.raises(InvalidArgument):
        parse_worker_id("123")
    assert str(parse_worker_id("7d1d3a56-0a37-4d59-9f36-0c1c8e0f6a11")).startswith("7d1d")


@pytest.mark.parametrize(("max_results", "expected"), [(0, 10), (1, 1), (100, 100), (5000, 100)])
def test_discovery_max_results_default_and_cap(max_results: int, expected: int) -> None:
    q = validate_discovery(
        required_capabilities=["python"],
        label_selector={},
        namespace="",
        max_results=max_results,
        limits=Limits(),
    )
    assert q.max_results == expected
    assert q.namespace == "default"


def test_bad_discovery_reports_every_field() -> None:
    with pytest.raises(InvalidArgument) as exc:
        validate_discovery(
            required_capabilities=["ok", "bad cap"],
            label_selector={"": "x"},
            namespace="NOPE",
            max_results=-1,
            limits=Limits(),
        )
    assert fields(exc) == {
        "required_capabilities[1]",
        "label_selector[]",
        "namespace",
        "max_results",
    }


def test_list_cursor_round_trip_and_bad_token() -> None:
    token = encode_cursor(ListCursor(namespace="default", name="w1"))
    q = _listing(statuses=[WorkerStatus.HEALTHY], capability="python", page_token=token)
    assert q.after == ListCursor(namespace="default", name="w1")
    assert q.namespace is None
    assert q.page_size == 50
    for bad in ("!!!", encode_cursor(ListCursor("a", "b"))[:-3] + "xyz", "e30"):
        with pytest.raises(InvalidArgument) as exc:
            _listing(page_size=10, page_token=bad)
        assert fields(exc) == {"page_token"}


def test_nul_is_refused_before_it_reaches_the_database() -> None:
    # PostgreSQL text and jsonb cannot hold NUL: bad input, not a database error.
    with pytest.raises(InvalidArgument) as exc:
        validate_registration(
            **{**GOOD_REGISTRATION, "version": f"1{NUL}", "labels": {"zone": f"eu{NUL}"}}
        )
    assert {(v.field, v.description) for v in exc.value.violations} == {
        ("version", "must not contain NUL (\\u0000) characters"),
        ("labels[zone]", "must not contain NUL (\\u0000) characters"),
    }
    with pytest.raises(InvalidArgument) as exc:
        validate_discovery(
            required_capabilities=[],
            label_selector={"zone": f"{NUL}"},
            namespace="",
            max_results=0,
            limits=Limits(),
        )
    assert fields(exc) == {"label_selector[zone]"}
    with pytest.raises(InvalidArgument) as exc:
        _listing(labels=[f"zone={NUL}"])
    assert fields(exc) == {"label[0]"}


def _token(value: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    "token",
    [
        _token(["default", f"a{NUL}"]),  # a NUL would reach PostgreSQL
        _token([f"default{NUL}", "a"]),
        _token(["default", "\ud800"]),  # a lone surrogate cannot even be encoded
        _token(["NOT A NAMESPACE", "a"]),
        _token(["default", "x" * 129]),
        encode_cursor(ListCursor("default", "w1")) + NUL,  # b64decode would drop the NUL
        base64.urlsafe_b64encode(b"[" * 1500).decode(),  # a RecursionError was a 500
    ],
)
def test_forged_page_tokens_are_malformed(token: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        _listing(page_token=token)
    assert fields(exc) == {"page_token"}


def test_echoed_input_and_the_violation_list_are_bounded() -> None:
    # They travel in a gRPC trailer: beyond 8-16 KiB the client gets no typed error at all.
    with pytest.raises(InvalidArgument) as exc:
        validate_registration(**{**GOOD_REGISTRATION, "labels": {"k" * 20_000 + "-": "v"}})
    assert fields(exc) == {"labels[" + "k" * 64 + "\u2026]"}

    with pytest.raises(InvalidArgument) as exc:
        validate_discovery(
            required_capabilities=["bad cap"] * 50,
            label_selector={f"bad key {i}" + "_" * 600: "v" for i in range(32)},
            namespace="",
            max_results=0,
            limits=Limits(),
        )
    violations = exc.value.violations
    assert len(violations) == MAX_REPORTED_VIOLATIONS + 1
    assert violations[-1].field == "request"
    assert violations[-1].description == "62 more violations not shown"
    assert sum(len(v.field) + len(v.description) for v in violations) < 4096


def test_list_label_selectors_are_named_by_position_and_keys_are_unique() -> None:
    def bad(labels: list[str]) -> list[tuple[str, str]]:
        with pytest.raises(InvalidArgument) as exc:
            _listing(labels=labels, field_prefix="query.")
        return [(v.field, v.description) for v in exc.value.violations]

    # Both values cannot hold at once, and neither may silently win.
    assert bad(["stack=nope", "stack=dev"]) == [
        ("query.label[1]", "label key 'stack' is given more than once")
    ]
    assert [field for field, _ in bad(["novalue", "-a=1", "ok=1"])] == [
        "query.label[0]",
        "query.label[1]",
    ]
    q = _listing(labels=["zone=eu", "tier=a=b", "empty="])
    assert q.label_selector == {"zone": "eu", "tier": "a=b", "empty": ""}


def test_watch_namespace() -> None:
    assert validate_watch(namespace="") is None
    assert validate_watch(namespace="batch") == "batch"
    with pytest.raises(InvalidArgument) as exc:
        validate_watch(namespace="BAD")
    assert exc.value.message == "invalid watch request"
    assert fields(exc) == {"namespace"}
