"""configure_logging: JSON fields, stdlib routing, contextvars, idempotence."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from hive_common.logging import (
    bind_request_context,
    clear_request_context,
    configure_logging,
    current_request_context,
    get_logger,
    request_context,
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


def test_request_context_manager_restores() -> None:
    stream = configure()
    bind_request_context(request_id="outer")
    with request_context(ticket_id="t-9", plan_id=None):
        assert dict(current_request_context()) == {"request_id": "outer", "ticket_id": "t-9"}
        get_logger().info("inside")
    assert dict(current_request_context()) == {"request_id": "outer"}
    assert lines(stream)[0]["ticket_id"] == "t-9"


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
