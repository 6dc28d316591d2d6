"""Validation reports every bad field with its path; page tokens and cursors round-trip."""

from __future__ import annotations

import base64
import math
from typing import Any, cast

import pytest
from google.protobuf.message import DecodeError

from execution_ticket_service.domain.models import Priority, TicketFilter, TicketStatus
from execution_ticket_service.domain.paging import (
    Cursor,
    decode_cursor,
    decode_page_token,
    decode_watch_cursor,
    encode_cursor,
    encode_page_token,
    fill_page,
    filter_digest,
)
from execution_ticket_service.domain.validation import (
    MAX_JSON_NESTING,
    Limits,
    RawAssignment,
    RawTicketSpec,
    Violations,
    json_size,
    resolve_page_size,
    resolve_token_ttl,
    validate_assignment,
    validate_assignments,
    validate_batch,
    validate_create,
    validate_filter,
    validate_status_update,
    validate_ticket_id,
)
from hive_common.errors import InvalidArgument
from neuralhive.ticket.v1 import ticket_service_pb2 as pb

LIMITS = Limits(max_parameters_bytes=100)
TID = "6F1F0A3E-8A47-4CF8-9A0F-3C1D1FBB7A11"


def good(**kwargs: object) -> RawTicketSpec:
    values: dict[str, object] = {"plan_id": "p", "task_id": "t", "task_type": "echo"}
    values.update(kwargs)
    return RawTicketSpec(**values)  # type: ignore[arg-type]


def fields_of(error: InvalidArgument) -> set[str]:
    return {v.field for v in error.violations}


def test_defaults_are_resolved() -> None:
    spec = validate_create(good(), LIMITS)
    assert spec.priority is Priority.NORMAL
    assert spec.timeout_seconds == LIMITS.default_timeout_seconds
    assert validate_create(good(priority="HIGH", timeout_seconds=5), LIMITS).timeout_seconds == 5


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (good(plan_id=""), "ticket.plan_id"),
        (good(plan_id="   "), "ticket.plan_id"),
        (good(plan_id="x" * 201), "ticket.plan_id"),
        (good(task_id=""), "ticket.task_id"),
        (good(task_id="a\nb"), "ticket.task_id"),
        (good(task_type=""), "ticket.task_type"),
        (good(intent_id=" "), "ticket.intent_id"),
        (good(description="d" * 4001), "ticket.description"),
        (good(parameters={"blob": "x" * 200}), "ticket.parameters"),
        (good(required_capabilities=["a", "a"]), "ticket.required_capabilities[1]"),
        (good(required_capabilities=[""]), "ticket.required_capabilities[0]"),
        (good(depends_on=["t"]), "ticket.depends_on"),
        (good(priority="URGENT"), "ticket.priority"),
        (good(priority="7"), "ticket.priority"),
        (good(max_retries=-1), "ticket.max_retries"),
        (good(max_retries=101), "ticket.max_retries"),
        (good(timeout_seconds=-5), "ticket.timeout_seconds"),
        (good(timeout_seconds=10**9), "ticket.timeout_seconds"),
    ],
)
def test_bad_spec_names_the_field(spec: RawTicketSpec, field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        validate_create(spec, LIMITS)
    assert field in fields_of(info.value)


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(InvalidArgument) as info:
        validate_create(RawTicketSpec(priority="NOPE"), LIMITS)
    assert fields_of(info.value) == {
        "ticket.plan_id",
        "ticket.task_id",
        "ticket.task_type",
        "ticket.priority",
    }


def test_batch_paths_and_duplicates() -> None:
    with pytest.raises(InvalidArgument) as info:
        validate_batch([good(), good(task_id=""), good()], LIMITS)
    assert fields_of(info.value) == {"tickets[1].task_id", "tickets[2].task_id"}
    with pytest.raises(InvalidArgument):
        validate_batch([], LIMITS)
    with pytest.raises(InvalidArgument):
        validate_batch([good(task_id=str(i)) for i in range(3)], Limits(max_batch_size=2))
    assert len(validate_batch([good(task_id="a"), good(task_id="b")], LIMITS)) == 2


def test_ticket_ids_are_uuids_in_canonical_form() -> None:
    assert validate_ticket_id(TID) == TID.lower()
    for bad in ("", "nope", "123"):
        with pytest.raises(InvalidArgument) as info:
            validate_ticket_id(bad)
        assert fields_of(info.value) == {"ticket_id"}


def test_assignment_validation() -> None:
    ok = validate_assignment(RawAssignment(TID, "w", 0, 1, None), LIMITS)
    assert ok.lease_seconds == LIMITS.default_lease_seconds
    with pytest.raises(InvalidArgument) as info:
        validate_assignment(RawAssignment("x", "", -1, 0, 0), LIMITS)
    assert fields_of(info.value) == {
        "ticket_id",
        "worker_id",
        "lease_seconds",
        "attempt",
        "expected_version",
    }


def test_assignments_validation_names_each_item_and_refuses_repeats() -> None:
    other = "00000000-0000-4000-8000-000000000002"
    ok = validate_assignments(
        [RawAssignment(TID, "w1", 0, 1, None), RawAssignment(other, "w2", 30, 2, 3)], LIMITS
    )
    assert [(a.ticket_id, a.worker_id, a.lease_seconds) for a in ok] == [
        (TID.lower(), "w1", LIMITS.default_lease_seconds),
        (other, "w2", 30),
    ]
    with pytest.raises(InvalidArgument) as info:
        validate_assignments(
            [
                RawAssignment(TID, "w1", 0, 1, None),
                RawAssignment("x", "", 0, 0, None),
                RawAssignment(TID.upper(), "w3", 0, 1, None),
            ],
            LIMITS,
        )
    assert fields_of(info.value) == {
        "assignments[1].ticket_id",
        "assignments[1].worker_id",
        "assignments[1].attempt",
        "assignments[2].ticket_id",  # the same ticket as assignments[0]
    }
    for raws in ([], [RawAssignment(TID, "w", 0, 1, None)] * (LIMITS.max_batch_size + 1)):
        with pytest.raises(InvalidArgument) as info:
            validate_assignments(raws, LIMITS)
        assert fields_of(info.value) == {"assignments"}


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"status": ""}, "status"),
        ({"status": "PENDING"}, "status"),
        ({"status": "ASSIGNED"}, "status"),
        ({"status": "BOGUS"}, "status"),
        ({"attempt": 0}, "attempt"),
        ({"attempt": -1, "status": "CANCELLED"}, "attempt"),
        ({"expected_version": 0}, "expected_version"),
        ({"permanent": True}, "permanent"),
        ({"error_message": "e" * 4001, "status": "FAILED"}, "error_message"),
        # Fields the status does not keep were accepted and dropped.
        ({"error_message": "oops"}, "error_message"),
        ({"error_message": "oops", "status": "COMPLETED"}, "error_message"),
        ({"result": {"out": 1}}, "result"),
        ({"result": {}, "status": "CANCELLED"}, "result"),
        ({"ticket_id": "zzz"}, "ticket_id"),
    ],
)
def test_bad_status_update_names_the_field(kwargs: dict[str, object], field: str) -> None:
    values: dict[str, object] = {
        "ticket_id": TID,
        "status": "RUNNING",
        "attempt": 1,
        "expected_version": None,
        "result": None,
        "error_message": "",
        "permanent": False,
    }
    values.update(kwargs)
    with pytest.raises(InvalidArgument) as info:
        validate_status_update(limits=LIMITS, **values)  # type: ignore[arg-type]
    assert field in fields_of(info.value)


def test_cancel_may_omit_the_attempt() -> None:
    update = validate_status_update(
        ticket_id=TID,
        status="CANCELLED",
        attempt=0,
        expected_version=None,
        result=None,
        error_message="",
        permanent=False,
        limits=LIMITS,
    )
    assert update.status is TicketStatus.CANCELLED


def test_filter_and_page_size() -> None:
    errors = Violations()
    f = validate_filter(plan_id="p", statuses=["RUNNING", "X"], worker_id="", errors=errors)
    assert f.statuses == {TicketStatus.RUNNING}
    assert [v.field for v in errors.items] == ["statuses[1]"]
    errors = Violations()
    assert resolve_page_size(0, LIMITS, errors) == LIMITS.default_page_size
    assert resolve_page_size(10**6, LIMITS, errors) == LIMITS.max_page_size
    assert not errors.items
    resolve_page_size(-1, LIMITS, errors)
    assert [v.field for v in errors.items] == ["page_size"]


def test_status_filters_take_any_case_and_name_the_unspecified_status() -> None:
    errors = Violations()
    f = validate_filter(plan_id="", statuses=["running", "Failed", ""], worker_id="", errors=errors)
    assert f.statuses == {TicketStatus.RUNNING, TicketStatus.FAILED}
    assert [(v.field, v.description) for v in errors.items] == [
        (
            "statuses[2]",
            "no status (unspecified); use one of PENDING, ASSIGNED, RUNNING, COMPLETED, "
            "FAILED, CANCELLED",
        )
    ]


def test_token_ttl() -> None:
    assert resolve_token_ttl(0, LIMITS) == LIMITS.default_token_ttl_seconds
    with pytest.raises(InvalidArgument):
        resolve_token_ttl(LIMITS.max_token_ttl_seconds + 1, LIMITS)


def test_page_token_round_trip_and_filter_binding() -> None:
    f = TicketFilter(plan_id="p", statuses=frozenset({TicketStatus.PENDING}))
    token = encode_page_token(42, f)
    errors = Violations()
    assert decode_page_token(token, f, errors) == 42
    assert decode_page_token("", f, errors) == 0
    assert not errors.items
    decode_page_token(token, TicketFilter(plan_id="q"), errors)
    decode_page_token("garbage!", f, errors)
    decode_page_token(encode_cursor(Cursor(1, 2)), f, errors)
    assert [v.field for v in errors.items] == ["page_token"] * 3


def test_a_page_ends_before_the_ticket_that_would_pass_its_byte_budget() -> None:
    rows = cast(Any, [(10, "aaa"), (11, "bbb"), (12, "cccccccc"), (13, "d")])

    def page(rows: Any, *, more: bool = False) -> tuple[list[str], int | None]:
        return fill_page(rows, more=more, convert=str, size=len, max_bytes=6)

    assert page(rows) == (["aaa", "bbb"], 11)  # continue after seq 11
    assert page(rows[2:]) == (["cccccccc"], 12)  # the first goes, however large
    assert page(rows[3:]) == (["d"], None)  # the end of the listing
    assert page(rows[3:], more=True) == (["d"], 13)  # the rows read were not all
    assert page([]) == ([], None)


def test_cursor_round_trip_and_order() -> None:
    errors = Violations()
    assert decode_cursor(encode_cursor(Cursor(xid=7, seq=9)), errors) == Cursor(7, 9)
    assert decode_cursor("", errors) is None
    assert decode_cursor("bm9wZQ", errors) is None
    assert [v.field for v in errors.items] == ["cursor"]
    assert Cursor(1, 9) < Cursor(2, 1) < Cursor(2, 2)


def test_watch_cursors_carry_the_snapshot_position() -> None:
    errors = Violations()
    every = TicketFilter()
    plain = encode_cursor(Cursor(xid=7, seq=9))
    mid = encode_cursor(Cursor(xid=7, seq=9), snapshot_after=41)
    assert decode_watch_cursor(plain, every, errors) == (Cursor(7, 9), None)
    assert decode_watch_cursor(mid, every, errors) == (Cursor(7, 9), 41)
    assert decode_cursor(mid, errors) == Cursor(7, 9)  # the log position alone
    assert decode_watch_cursor("", every, errors) == (None, None)
    assert not errors.items
    forged = base64.urlsafe_b64encode(b'{"v":1,"x":7,"s":9,"t":-1}').decode().rstrip("=")
    assert decode_watch_cursor(forged, every, errors) == (None, None)
    assert [v.field for v in errors.items] == ["cursor"]


def test_a_cursor_in_a_snapshot_resumes_only_a_watch_of_its_filters() -> None:
    # Applied to another plan's watch, the rest of *that* snapshot was cut short.
    plan_x, plan_y = TicketFilter(plan_id="x"), TicketFilter(plan_id="y")
    mid = encode_cursor(Cursor(xid=7, seq=9), snapshot_after=41, ticket_filter=plan_y)
    errors = Violations()
    assert decode_watch_cursor(mid, plan_y, errors) == (Cursor(7, 9), 41)
    assert not errors.items
    assert decode_watch_cursor(mid, plan_x, errors) == (None, None)
    [violation] = errors.items
    assert violation.field == "cursor"
    assert "other filters" in violation.description
    # A plain position suits any filters; a cursor issued before the binding is taken.
    plain = encode_cursor(Cursor(xid=7, seq=9), ticket_filter=plan_y)
    unbound = _forged('{"v":1,"x":7,"s":9,"t":41}')
    errors = Violations()
    assert decode_watch_cursor(plain, plan_x, errors) == (Cursor(7, 9), None)
    assert decode_watch_cursor(unbound, plan_x, errors) == (Cursor(7, 9), 41)
    assert not errors.items


def _forged(body: str) -> str:
    return base64.urlsafe_b64encode(body.encode()).decode().rstrip("=")


@pytest.mark.parametrize("number", ["true", "false", "1.5", "-1", str(2**63), '"7"'])
def test_forged_positions_are_not_tokens(number: str) -> None:
    # A bool is a Python int: it used to reach the database (INTERNAL, HTTP 500).
    ticket_filter = TicketFilter()
    digest = filter_digest(ticket_filter)
    errors = Violations()
    decode_page_token(_forged(f'{{"v":1,"after":{number},"f":"{digest}"}}'), ticket_filter, errors)
    decode_cursor(_forged(f'{{"v":1,"x":{number},"s":0}}'), errors)
    decode_cursor(_forged(f'{{"v":1,"x":0,"s":{number}}}'), errors)
    decode_watch_cursor(_forged(f'{{"v":1,"x":0,"s":0,"t":{number}}}'), ticket_filter, errors)
    assert [v.field for v in errors.items] == ["page_token", "cursor", "cursor", "cursor"]


def test_deeply_nested_tokens_are_not_tokens() -> None:
    # json.loads raised RecursionError: INTERNAL (HTTP 500) instead of bad input.
    ticket_filter = TicketFilter()
    errors = Violations()
    deep = _forged("[" * 1500)
    decode_page_token(deep, ticket_filter, errors)
    decode_watch_cursor(deep, ticket_filter, errors)
    assert [v.field for v in errors.items] == ["page_token", "cursor"]


@pytest.mark.parametrize("after", [10, 100, 10_000, 100_000])
@pytest.mark.parametrize("mangle", [lambda t: t + "\x00", lambda t: "\x00" + t, lambda t: t + " "])
def test_tokens_with_foreign_characters_are_not_tokens(after: int, mangle: Any) -> None:
    ticket_filter = TicketFilter()
    errors = Violations()
    decode_page_token(mangle(encode_page_token(after, ticket_filter)), ticket_filter, errors)
    decode_cursor(mangle(encode_cursor(Cursor(xid=after, seq=after))), errors)
    assert {v.field for v in errors.items} == {"page_token", "cursor"}
    assert len(errors.items) == 2


NUL = "\x00"


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (good(description=f"a{NUL}"), "ticket.description"),
        (good(task_type=f"echo{NUL}"), "ticket.task_type"),
        (good(parameters={"a": f"{NUL}"}), "ticket.parameters.a"),
        (good(parameters={"a": [1, {"b": [f"{NUL}"]}]}), "ticket.parameters.a[1].b[0]"),
        (good(parameters={f"{NUL}": 1}), "ticket.parameters"),
        (good(parameters={"a": {f"k{NUL}": 1}}), "ticket.parameters.a"),
    ],
)
def test_nul_in_a_spec_names_the_field(spec: RawTicketSpec, field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        validate_create(spec, LIMITS)
    assert fields_of(info.value) == {field}


def test_the_text_of_an_escaped_nul_is_not_a_nul() -> None:
    text = "\\u0000"  # a backslash, then "u0000"
    spec = validate_create(good(parameters={text: text, "a": [text]}), LIMITS)
    assert spec.parameters == {text: text, "a": [text]}


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"error_message": f"x{NUL}y"}, "error_message"),
        ({"result": {"foo": f"{NUL}"}}, "result.foo"),
        ({"result": {"foo": {"bar": [True, None, f"{NUL}"]}}}, "result.foo.bar[2]"),
        ({"result": {f"k{NUL}": "v"}}, "result"),
    ],
)
def test_nul_in_a_status_update_names_the_field(kwargs: dict[str, Any], field: str) -> None:
    values: dict[str, Any] = {
        "ticket_id": TID,
        "status": "FAILED",
        "attempt": 1,
        "expected_version": None,
        "result": None,
        "error_message": "",
        "permanent": False,
        "limits": LIMITS,
        **kwargs,
    }
    with pytest.raises(InvalidArgument) as info:
        validate_status_update(**values)
    assert fields_of(info.value) == {field}


def _update(**kwargs: Any) -> dict[str, Any]:
    return {
        "ticket_id": TID,
        "status": "COMPLETED",
        "attempt": 1,
        "expected_version": None,
        "result": None,
        "error_message": "",
        "permanent": False,
        "limits": Limits(),
        **kwargs,
    }


@pytest.mark.parametrize("number", [math.inf, -math.inf, math.nan])
def test_non_finite_numbers_are_refused_with_their_path(number: float) -> None:
    with pytest.raises(InvalidArgument) as info:
        validate_create(good(parameters={"a": [1, {"b": number}]}), LIMITS)
    assert fields_of(info.value) == {"ticket.parameters.a[1].b"}
    with pytest.raises(InvalidArgument) as info:
        validate_status_update(**_update(result={"x": number}))
    assert fields_of(info.value) == {"result.x"}


def test_text_that_spells_a_non_finite_number_is_fine() -> None:
    parameters = {"NaN": "Infinity", "x": "-Infinity"}
    assert validate_create(good(parameters=parameters), LIMITS).parameters == parameters


def _nested(levels: int, *, arrays: bool = False) -> dict[str, Any]:
    """An object nested ``levels`` deep counting itself (every other level an array if
    ``arrays``)."""
    value: Any = {"leaf": 1}
    for level in range(levels - 1):
        value = [value] if arrays and level % 2 else {"a": value}
    return value if isinstance(value, dict) else {"a": value}


@pytest.mark.parametrize("arrays", [False, True])
def test_json_nesting_is_bounded_where_every_watcher_can_still_decode_it(arrays: bool) -> None:
    deepest = _nested(MAX_JSON_NESTING, arrays=arrays)
    assert validate_create(good(parameters=deepest), Limits()).parameters == deepest
    assert validate_status_update(**_update(result=deepest)).result == deepest
    too_deep = {"x": 1, "deep": _nested(MAX_JSON_NESTING, arrays=arrays)}
    with pytest.raises(InvalidArgument) as info:
        validate_create(good(parameters=too_deep), Limits())
    (field,) = fields_of(info.value)
    assert field.startswith("ticket.parameters.deep")
    assert field.count(".") + field.count("[") == MAX_JSON_NESTING + 1
    with pytest.raises(InvalidArgument) as info:
        validate_status_update(**_update(result=too_deep))
    assert {v.description for v in info.value.violations} == {
        f"nests more than {MAX_JSON_NESTING} levels deep"
    }


def test_the_nesting_limit_keeps_every_ticket_message_decodable() -> None:
    def watch_response(value: dict[str, Any]) -> bytes:
        # The deepest message that carries a ticket: a watch response's event's ticket.
        response = pb.WatchTicketsResponse()
        ticket = response.events.add().ticket
        ticket.parameters.update(value)
        ticket.result.update(value)
        return response.SerializeToString()

    pb.WatchTicketsResponse.FromString(watch_response(_nested(MAX_JSON_NESTING)))
    with pytest.raises(DecodeError):
        pb.WatchTicketsResponse.FromString(watch_response(_nested(MAX_JSON_NESTING + 1)))


def test_other_control_characters_in_free_text_are_fine() -> None:
    spec = validate_create(good(description="a\tb\nc", parameters={"k\n": "v\t"}), LIMITS)
    assert spec.description == "a\tb\nc"


def test_sizes_are_counted_in_utf8_bytes_and_a_refusal_says_the_size() -> None:
    # ~400 KB of UTF-8, 1.2 MB with every "é" escaped as \u00e9 (which it was refused as).
    accented = {"r": "é" * 200_000}
    assert json_size(accented) == 400_008
    assert validate_status_update(**_update(result=accented)).result == accented
    with pytest.raises(InvalidArgument) as info:
        validate_status_update(**_update(result={"r": "é" * 600_000}))
    assert [(v.field, v.description) for v in info.value.violations] == [
        ("result", "is 1,200,008 bytes as JSON, at most 1,048,576")
    ]
    # Parameters alike (LIMITS: 100 bytes): {"p":"ç...ç"} is 8 bytes plus 2 per "ç".
    assert validate_create(good(parameters={"p": "ç" * 46}), LIMITS).parameters
    with pytest.raises(InvalidArgument) as info:
        validate_create(good(parameters={"p": "ç" * 47}), LIMITS)
    assert [(v.field, v.description) for v in info.value.violations] == [
        ("ticket.parameters", "is 102 bytes as JSON, at most 100")
    ]
    # A NUL is still found among characters that are no longer escaped.
    with pytest.raises(InvalidArgument) as info:
        validate_create(good(parameters={"p": f"ç{NUL}"}), LIMITS)
    assert fields_of(info.value) == {"ticket.parameters.p"}
