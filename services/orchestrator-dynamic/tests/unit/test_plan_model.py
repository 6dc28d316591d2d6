"""The canonical body hash behind "same plan_id + same body = same plan"."""

from __future__ import annotations

import json
from typing import Any

import pytest

from neuralhive.orchestrator.v1 import orchestrator_service_pb2 as orchestrator_pb
from orchestrator_dynamic.domain.plan import Plan, plan_body_hash
from orchestrator_dynamic.domain.validation import PlanValidator, ValidPlan
from orchestrator_dynamic.transport.grpc.servicer import plan_spec_json


def parse(raw: Any) -> Plan:
    result = PlanValidator().validate(raw)
    assert isinstance(result, ValidPlan), result
    return result.plan


BASE: dict[str, Any] = {
    "plan_id": "p1",
    "name": "release",
    "tasks": [
        {"task_id": "build", "task_type": "shell", "parameters": {"cmd": "make", "env": {"A": 1}}},
        {"task_id": "test", "task_type": "shell", "depends_on": ["build"]},
    ],
}


def variant(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(json.dumps(BASE))
    body.update(changes)
    return body


SAME: list[tuple[str, Any]] = [
    ("key order and whitespace", json.loads(json.dumps(BASE, indent=4, sort_keys=True))),
    (
        "defaults spelled out",
        variant(
            intent_id="",
            priority="NORMAL",
            tasks=[
                {
                    "task_id": "build",
                    "task_type": "shell",
                    "description": "",
                    "required_capabilities": [],
                    "depends_on": [],
                    "parameters": {"env": {"A": 1}, "cmd": "make"},
                    "max_retries": 0,
                },
                {
                    "task_id": "test",
                    "task_type": "shell",
                    "depends_on": ["build"],
                    "parameters": {},
                },
            ],
        ),
    ),
    (
        "whole numbers written as floats",
        variant(
            tasks=[
                {
                    "task_id": "build",
                    "task_type": "shell",
                    "parameters": {"cmd": "make", "env": {"A": 1.0}},
                },
                BASE["tasks"][1],
            ]
        ),
    ),
    ("different plan_id", variant(plan_id="p2")),
    ("no plan_id", {k: v for k, v in BASE.items() if k != "plan_id"}),
]

DIFFERENT: list[tuple[str, Any]] = [
    ("name", variant(name="release 2")),
    ("priority", variant(priority="HIGH")),
    ("intent", variant(intent_id="i")),
    ("task order", variant(tasks=list(reversed(BASE["tasks"])))),
    (
        "parameter value type",
        variant(
            tasks=[
                {
                    "task_id": "build",
                    "task_type": "shell",
                    "parameters": {"cmd": "make", "env": {"A": "1"}},
                },
                BASE["tasks"][1],
            ]
        ),
    ),
    (
        "max_retries",
        variant(tasks=[{**BASE["tasks"][0], "max_retries": 1}, BASE["tasks"][1]]),
    ),
    (
        "timeout",
        variant(tasks=[{**BASE["tasks"][0], "timeout_seconds": 10}, BASE["tasks"][1]]),
    ),
    (
        "dependency removed",
        variant(tasks=[BASE["tasks"][0], {"task_id": "test", "task_type": "shell"}]),
    ),
]


@pytest.mark.parametrize("body", [b for _, b in SAME], ids=[n for n, _ in SAME])
def test_equivalent_bodies_hash_the_same(body: Any) -> None:
    assert plan_body_hash(parse(body)) == plan_body_hash(parse(BASE))


@pytest.mark.parametrize("body", [b for _, b in DIFFERENT], ids=[n for n, _ in DIFFERENT])
def test_changed_bodies_hash_differently(body: Any) -> None:
    assert plan_body_hash(parse(body)) != plan_body_hash(parse(BASE))


def test_a_plan_hashes_the_same_as_json_and_as_protobuf() -> None:
    """The gRPC twin's Struct numbers are doubles; JSON may say 30 or 30.0."""
    spec = orchestrator_pb.PlanSpec(name="release")
    grpc_task = spec.tasks.add(task_id="build", task_type="shell")
    grpc_task.parameters.update({"n": 30, "f": 2.5, "l": [1, 2.0]})
    from_grpc = parse(plan_spec_json(spec))
    for numbers in ('{"n": 30, "f": 2.5, "l": [1, 2]}', '{"n": 30.0, "f": 2.5, "l": [1.0, 2.0]}'):
        from_json = parse(
            json.loads(
                '{"name": "release", "tasks": [{"task_id": "build", "task_type": "shell", '
                f'"parameters": {numbers}}}]}}'
            )
        )
        assert plan_body_hash(from_json) == plan_body_hash(from_grpc)
        assert from_json.tasks[0].parameters == from_grpc.tasks[0].parameters


def test_hash_format() -> None:
    digest = plan_body_hash(parse(BASE))

    assert digest.startswith("sha256:")
    assert len(digest) == len("sha256:") + 64


def test_json_round_trip_keeps_the_plan_and_its_hash() -> None:
    original = parse(variant(priority="CRITICAL", intent_id="i-1"))

    stored = json.loads(json.dumps(original.to_json()))
    restored = Plan.from_json(stored)

    assert restored == original
    assert plan_body_hash(restored) == plan_body_hash(original)


def test_with_plan_id_keeps_everything_else() -> None:
    original = parse({k: v for k, v in BASE.items() if k != "plan_id"})

    named = original.with_plan_id("generated")

    assert named.plan_id == "generated"
    assert named.tasks == original.tasks
    assert plan_body_hash(named) == plan_body_hash(original)
