"""configure_logging: JSON fields, stdlib routing, contextvars, levels, idempotence, errors."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import structlog

from hive_common.logging import (
    bind_request_context,
    clear_request_context,
    configure_logging,
    get_logger,
)


@pytest.fixture(autouse=True)
def fresh_context() -> Iterator[None]:
    clear_request_context()
    yield
    clear_request_context()


def configure(**kwargs: Any) -> io.StringIO:
    stream = io.StringIO()
    configure_logging(stream=stream, **{"level": "INFO", "fmt": "json", **kwargs})
    return stream


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_fields() -> None:
    stream = configure()
    get_logger("hive.test").info("ticket created", ticket_id="t-1", attempt=2)
    [line] = lines(stream)
    assert line["event"] == "ticket created"
    assert line["level"] == "info"
    assert line["logger"] == "hive.test"
    assert line["ticket_id"] == "t-1"
    assert line["attempt"] == 2
    assert line["timestamp"].endswith("Z")


def test_stdlib_records_go_through_structlog() -> None:
    stream = configure()
    logging.getLogger("uvicorn.error").warning("port %d busy", 8000)
    logging.getLogger("grpc._cython.cygrpc").error("grpc says %s", "hi")
    logging.getLogger("some.library").info("plain stdlib")
    assert [(x["logger"], x["level"], x["event"]) for x in lines(stream)] == [
        ("uvicorn.error", "warning", "port 8000 busy"),
        ("grpc._cython.cygrpc", "error", "grpc says hi"),
        ("some.library", "info", "plain stdlib"),
    ]


def test_a_stream_whose_client_went_away_is_not_an_error() -> None:
    # grpc logged it at ERROR with a traceback: a client of WatchTickets killed while
    # messages were on their way.
    out = configure(fmt="json")
    grpc_core = logging.getLogger("grpc._cython.cygrpc")
    try:
        raise RuntimeError("Failed grpc_call_start_batch")
    except RuntimeError:
        grpc_core.exception(
            "ExecuteBatchError raised in core by servicer method [%s]", "/x.Service/Watch"
        )
        grpc_core.exception("Unexpected error in %s", "/x.Service/Get")
    gone, other = lines(out)
    assert gone["level"] == "info"
    assert gone["event"] == (
        "ExecuteBatchError raised in core by servicer method [/x.Service/Watch]: "
        "the client went away before it was sent"
    )
    assert "exception" not in gone
    assert (other["level"], "exception" in other) == ("error", True)


def test_uvicorn_loggers_lose_their_own_handlers() -> None:
    uvicorn_logger = logging.getLogger("uvicorn")
    uvicorn_logger.addHandler(logging.StreamHandler(io.StringIO()))
    uvicorn_logger.propagate = False
    stream = configure()
    logging.getLogger("uvicorn").info("started")
    assert [x["event"] for x in lines(stream)] == ["started"]
    assert uvicorn_logger.handlers == []


def test_contextvars_appear_in_structlog_and_stdlib_lines() -> None:
    stream = configure()
    bind_request_context(request_id="r-1", plan_id="p-1", ticket_id=None)
    get_logger("hive.test").info("one")
    logging.getLogger("stdlib").info("two")
    clear_request_context()
    get_logger("hive.test").info("three")
    one, two, three = lines(stream)
    assert (one["request_id"], one["plan_id"]) == ("r-1", "p-1")
    assert "ticket_id" not in one
    assert (two["request_id"], two["plan_id"]) == ("r-1", "p-1")
    assert "request_id" not in three


def test_configure_twice_does_not_duplicate() -> None:
    first = configure()
    second = configure()
    get_logger("x").info("once")
    logging.getLogger("y").info("twice?")
    assert first.getvalue() == ""
    assert [x["event"] for x in lines(second)] == ["once", "twice?"]
    marked = [h for h in logging.getLogger().handlers if getattr(h, "_hive_common_handler", False)]
    assert len(marked) == 1


def test_level_filters_both_worlds() -> None:
    stream = configure(level="WARNING")
    get_logger("x").info("hidden")
    logging.getLogger("y").info("hidden too")
    get_logger("x").warning("shown")
    assert [x["event"] for x in lines(stream)] == ["shown"]


def test_exception_is_rendered_as_text_traceback() -> None:
    stream = configure()
    try:
        raise ValueError("bad thing")
    except ValueError:
        get_logger("x").exception("failed")
    [line] = lines(stream)
    assert line["level"] == "error"
    assert "Traceback" in line["exception"]
    assert "ValueError: bad thing" in line["exception"]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_pretty_format_has_colours_on_a_terminal_only() -> None:
    # make dev writes each service's pretty log to a file: it was full of escape codes.
    file = configure(fmt="pretty")
    get_logger("x").warning("hello", plan_id="p")
    assert "\x1b[" not in file.getvalue()
    terminal = Terminal()
    configure_logging(stream=terminal, level="INFO", fmt="pretty")
    get_logger("x").warning("hello", plan_id="p")
    assert "\x1b[" in terminal.getvalue()


def test_pretty_format_is_not_json() -> None:
    stream = configure(fmt="pretty")
    get_logger("x").info("hello", plan_id="p")
    output = stream.getvalue()
    assert "hello" in output
    assert "plan_id" in output
    with pytest.raises(json.JSONDecodeError):
        json.loads(output)


def test_auto_is_json_when_not_a_terminal() -> None:
    stream = configure(fmt="auto")
    get_logger("x").info("auto")
    assert lines(stream)[0]["event"] == "auto"


def parse_utc(timestamp: str) -> datetime:
    parsed = datetime.fromisoformat(timestamp.removesuffix("Z") + "+00:00")
    assert timestamp.endswith("Z")
    return parsed


def test_structlog_line_has_exactly_the_documented_keys() -> None:
    stream = configure()
    bind_request_context(request_id="r-1", ticket_id="t-1")
    before = datetime.now(UTC)
    get_logger("hive.grpc").info(
        "rpc", method="/pkg.Svc/Get", code="OK", duration_ms=1.2, peer="ipv4:127.0.0.1:1"
    )
    after = datetime.now(UTC)
    [line] = lines(stream)
    timestamp = line.pop("timestamp")
    assert line == {
        "event": "rpc",
        "level": "info",
        "logger": "hive.grpc",
        "request_id": "r-1",
        "ticket_id": "t-1",
        "method": "/pkg.Svc/Get",
        "code": "OK",
        "duration_ms": 1.2,
        "peer": "ipv4:127.0.0.1:1",
    }
    assert before - timedelta(seconds=1) <= parse_utc(timestamp) <= after + timedelta(seconds=1)


def test_stdlib_line_has_exactly_the_documented_keys() -> None:
    stream = configure()
    bind_request_context(plan_id="p-1")
    logging.getLogger("yoyo.migrations").warning("applied %d migrations", 3)
    [line] = lines(stream)
    timestamp = line.pop("timestamp")
    parse_utc(timestamp)
    assert line == {
        "event": "applied 3 migrations",
        "level": "warning",
        "logger": "yoyo.migrations",
        "plan_id": "p-1",
    }


def test_logger_names_from_every_way_of_getting_a_logger() -> None:
    stream = configure()
    get_logger("hive.named").info("a")
    get_logger().info("b")  # no name: the root logger's name, as before
    structlog.stdlib.get_logger("hive.grpc").info("c")  # how hive_common's servers get theirs
    structlog.get_logger().info("d")  # guessed from the calling module
    assert [x["logger"] for x in lines(stream)] == ["hive.named", "root", "hive.grpc", __name__]


def test_initial_values_bind_and_every_method() -> None:
    stream = configure(level="DEBUG")
    log = get_logger("hive.test", worker="w-1")
    bound = log.bind(ticket_id="t-1")
    log.debug("debug")
    bound.info("info %s", "formatted")
    bound.warning("warning")
    log.error("error")
    log.critical("critical")
    assert [(x["level"], x["event"], x["worker"], x.get("ticket_id")) for x in lines(stream)] == [
        ("debug", "debug", "w-1", None),
        ("info", "info formatted", "w-1", "t-1"),
        ("warning", "warning", "w-1", "t-1"),
        ("error", "error", "w-1", None),
        ("critical", "critical", "w-1", None),
    ]


def test_debug_level_shows_debug_from_both_worlds() -> None:
    stream = configure(level="DEBUG")
    get_logger("x").debug("structlog debug")
    logging.getLogger("y").debug("stdlib debug")
    assert [(x["level"], x["event"]) for x in lines(stream)] == [
        ("debug", "structlog debug"),
        ("debug", "stdlib debug"),
    ]


def test_numeric_levels_between_and_above_the_standard_ones() -> None:
    stream = configure(level=logging.INFO - 5)
    get_logger("x").debug("hidden")
    logging.getLogger("y").debug("hidden too")
    get_logger("x").info("shown")
    logging.getLogger("y").info("shown too")
    assert [x["event"] for x in lines(stream)] == ["shown", "shown too"]

    silent = configure(level=logging.CRITICAL + 10)
    get_logger("x").critical("nothing")
    logging.getLogger("y").critical("nothing either")
    assert silent.getvalue() == ""


def test_reconfiguration_reaches_loggers_created_before() -> None:
    log = get_logger("hive.early")
    first = configure(level="INFO")
    log.info("first")
    second = configure(level="WARNING", fmt="pretty")
    log.info("filtered now")
    log.warning("second")
    assert [x["event"] for x in lines(first)] == ["first"]
    output = second.getvalue()
    assert "filtered now" not in output
    assert "second" in output
    with pytest.raises(json.JSONDecodeError):
        json.loads(output)


def test_exception_text_has_no_frame_locals_and_accepts_an_exception_instance() -> None:
    stream = configure()
    secret = "hunter2-local-value"
    try:
        raise ValueError(f"bad {len(secret)}")
    except ValueError as exc:
        caught = exc
        get_logger("x").exception("failed")
        logging.getLogger("y").exception("stdlib failed")
    get_logger("x").error("later", exc_info=caught)
    structlog_line, stdlib_line, later = lines(stream)
    for line in (structlog_line, stdlib_line, later):
        assert line["level"] == "error"
        assert "Traceback (most recent call last)" in line["exception"]
        assert "ValueError: bad 19" in line["exception"]
        assert secret not in json.dumps(line)
        assert "exc_info" not in line


def test_stack_info_is_rendered() -> None:
    stream = configure()
    get_logger("x").info("where", stack_info=True)
    [line] = lines(stream)
    assert "test_stack_info_is_rendered" in line["stack"]


def test_a_line_that_cannot_be_written_or_rendered_does_not_fail_the_caller(
    capsys: pytest.CaptureFixture[str],
) -> None:
    stream = configure()
    circular: dict[str, Any] = {}
    circular["self"] = circular
    get_logger("x").info("unrenderable", value=circular)
    get_logger("x").info("fine")
    stream.close()
    get_logger("x").info("closed stream")
    logging.getLogger("y").info("closed stream too")
    errors = capsys.readouterr().err
    assert errors.count("--- Logging error ---") == 3
    assert "Circular reference" in errors
    assert "I/O operation on closed file" in errors


def test_pretty_format_escapes_control_characters_in_values() -> None:
    # A NUL in a request path made grep take the whole log for binary; an ESC sequence
    # would drive the terminal showing the log.
    stream = configure(fmt="pretty")
    get_logger("hive.test").info("http_request", path="/plans/x\x00y\x1b[2J\u202e\x85")
    line = stream.getvalue()
    assert "\x00" not in line
    assert "\u202e" not in line
    assert "x\\x00y\\x1b[2J\\u202e\\x85" in line
