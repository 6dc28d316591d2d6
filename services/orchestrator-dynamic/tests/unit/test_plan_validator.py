"""Every C1 rule, table-driven: input -> the exact (path, code) issues reported."""

from __future__ import annotations

import copy
import json
from typing import Any, cast

import pytest

from hive_common.errors import InvalidArgument
from orchestrator_dynamic.domain.plan import Priority
from orchestrator_dynamic.domain.validation import (
    InvalidPlan,
    IssueCode,
    PlanLimits,
    PlanValidator,
    Severity,
    UnknownFieldPolicy,
    ValidPlan,
)

E = IssueCode


def task(task_id: str, *depends_on: str, **extra: Any) -> dict[str, Any]:
    return {"task_id": task_id, "task_type": "echo", "depends_on": list(depends_on), **extra}


def plan(*tasks: Any, **extra: Any) -> dict[str, Any]:
    return {"name": "p", "tasks": list(tasks), **extra}


def issues_of(result: InvalidPlan | ValidPlan) -> set[tuple[str, IssueCode]]:
    if isinstance(result, ValidPlan):
        return set()
    return {(i.path, i.code) for i in result.errors}


SMALL = PlanLimits(
    max_tasks=3,
    max_dag_depth=2,
    max_parameters_bytes=20,
    max_parameters_nesting=2,
    max_id_length=8,
    max_name_length=5,
    max_description_length=4,
    max_task_type_length=6,
    max_capability_length=4,
    max_capabilities_per_task=2,
    max_dependencies_per_task=1,
    max_timeout_seconds=60,
    max_retries=3,
)

ERROR_CASES: list[tuple[str, object, set[tuple[str, IssueCode]]]] = [
    # -- top-level types and required fields
    ("not an object: array", [], {("$", E.WRONG_TYPE)}),
    ("not an object: string", "plan", {("$", E.WRONG_TYPE)}),
    ("not an object: null", None, {("$", E.WRONG_TYPE)}),
    ("not an object: number", 3.5, {("$", E.WRONG_TYPE)}),
    ("not an object: python object", object(), {("$", E.WRONG_TYPE)}),
    ("tasks missing", {"name": "x"}, {("$.tasks", E.REQUIRED)}),
    ("tasks null", {"tasks": None}, {("$.tasks", E.REQUIRED)}),
    ("tasks not an array", {"tasks": {"a": 1}}, {("$.tasks", E.WRONG_TYPE)}),
    ("tasks empty", {"tasks": []}, {("$.tasks", E.INVALID_VALUE)}),
    ("non-string key", {1: "x", "tasks": [task("a")]}, {("$", E.WRONG_TYPE)}),
    ("unknown top-level field", plan(task("a"), owner="me"), {("$.owner", E.UNKNOWN_FIELD)}),
    (
        "unknown field with odd name",
        plan(task("a"), **{"a b": 1}),
        {('$["a b"]', E.UNKNOWN_FIELD)},
    ),
    ("name not a string", plan(task("a"), name=5), {("$.name", E.WRONG_TYPE)}),
    ("intent_id not a string", plan(task("a"), intent_id=[]), {("$.intent_id", E.WRONG_TYPE)}),
    ("plan_id not a string", plan(task("a"), plan_id=7), {("$.plan_id", E.WRONG_TYPE)}),
    ("plan_id empty", plan(task("a"), plan_id=""), {("$.plan_id", E.INVALID_VALUE)}),
    ("plan_id bad chars", plan(task("a"), plan_id="a/b"), {("$.plan_id", E.INVALID_VALUE)}),
    ("plan_id leading dash", plan(task("a"), plan_id="-a"), {("$.plan_id", E.INVALID_VALUE)}),
    ("priority unknown", plan(task("a"), priority="URGENT"), {("$.priority", E.INVALID_VALUE)}),
    ("priority lower case", plan(task("a"), priority="high"), {("$.priority", E.INVALID_VALUE)}),
    ("priority not a string", plan(task("a"), priority=2), {("$.priority", E.WRONG_TYPE)}),
    # -- task types and required fields
    ("task not an object", plan(task("a"), "b"), {("$.tasks[1]", E.WRONG_TYPE)}),
    ("task null", plan(None), {("$.tasks[0]", E.WRONG_TYPE)}),
    ("task_id missing", plan({"task_type": "echo"}), {("$.tasks[0].task_id", E.REQUIRED)}),
    (
        "task_id not a string",
        plan({"task_id": 1, "task_type": "echo"}),
        {("$.tasks[0].task_id", E.WRONG_TYPE)},
    ),
    (
        "task_id empty",
        plan({"task_id": "", "task_type": "echo"}),
        {("$.tasks[0].task_id", E.INVALID_VALUE)},
    ),
    (
        "task_id with space",
        plan({"task_id": "b wheel", "task_type": "echo"}),
        {("$.tasks[0].task_id", E.INVALID_VALUE)},
    ),
    ("task_type missing", plan({"task_id": "a"}), {("$.tasks[0].task_type", E.REQUIRED)}),
    (
        "task_type not a string",
        plan({"task_id": "a", "task_type": ["shell"]}),
        {("$.tasks[0].task_type", E.WRONG_TYPE)},
    ),
    (
        "task_type bad pattern",
        plan({"task_id": "a", "task_type": "9shell"}),
        {("$.tasks[0].task_type", E.INVALID_VALUE)},
    ),
    (
        "unknown task field (typo of depends_on)",
        plan(task("a"), {"task_id": "b", "task_type": "echo", "depend_on": ["a"]}),
        {("$.tasks[1].depend_on", E.UNKNOWN_FIELD)},
    ),
    (
        "task with non-string key",
        plan({"task_id": "a", "task_type": "echo", 3: 1}),
        {("$.tasks[0]", E.WRONG_TYPE)},
    ),
    (
        "description not a string",
        plan(task("a", description=1)),
        {("$.tasks[0].description", E.WRONG_TYPE)},
    ),
    (
        "required_capabilities not an array",
        plan(task("a", required_capabilities="python")),
        {("$.tasks[0].required_capabilities", E.WRONG_TYPE)},
    ),
    (
        "capability not a string",
        plan(task("a", required_capabilities=["python", 3])),
        {("$.tasks[0].required_capabilities[1]", E.WRONG_TYPE)},
    ),
    (
        "capability empty",
        plan(task("a", required_capabilities=[""])),
        {("$.tasks[0].required_capabilities[0]", E.INVALID_VALUE)},
    ),
    (
        "capability bad chars",
        plan(task("a", required_capabilities=["py thon"])),
        {("$.tasks[0].required_capabilities[0]", E.INVALID_VALUE)},
    ),
    (
        "capability duplicated",
        plan(task("a", required_capabilities=["python", "shell", "python"])),
        {("$.tasks[0].required_capabilities[2]", E.DUPLICATE_ENTRY)},
    ),
    (
        "depends_on not an array",
        plan(task("a"), {"task_id": "b", "task_type": "echo", "depends_on": "a"}),
        {("$.tasks[1].depends_on", E.WRONG_TYPE)},
    ),
    (
        "dependency not a string",
        plan(task("a"), {"task_id": "b", "task_type": "echo", "depends_on": ["a", {"id": "a"}]}),
        {("$.tasks[1].depends_on[1]", E.WRONG_TYPE)},
    ),
    (
        "dependency duplicated",
        plan(task("a"), task("b", "a", "a")),
        {("$.tasks[1].depends_on[1]", E.DUPLICATE_ENTRY)},
    ),
    (
        "parameters not an object",
        plan(task("a", parameters=["x"])),
        {("$.tasks[0].parameters", E.WRONG_TYPE)},
    ),
    (
        "parameters with NaN",
        plan(task("a", parameters={"x": [1, float("nan")]})),
        {("$.tasks[0].parameters.x[1]", E.INVALID_VALUE)},
    ),
    (
        "parameters with infinity",
        plan(task("a", parameters={"x": float("inf")})),
        {("$.tasks[0].parameters.x", E.INVALID_VALUE)},
    ),
    (
        "parameters with non-JSON value",
        plan(task("a", parameters={"x": {1, 2}, "y": b"z"})),
        {("$.tasks[0].parameters.x", E.WRONG_TYPE), ("$.tasks[0].parameters.y", E.WRONG_TYPE)},
    ),
    (
        "parameters with non-string key",
        plan(task("a", parameters={"x": {1: "a"}})),
        {("$.tasks[0].parameters.x", E.WRONG_TYPE)},
    ),
    (
        "timeout not an integer",
        plan(task("a", timeout_seconds="30")),
        {("$.tasks[0].timeout_seconds", E.WRONG_TYPE)},
    ),
    (
        "timeout a float",
        plan(task("a", timeout_seconds=30.0)),
        {("$.tasks[0].timeout_seconds", E.WRONG_TYPE)},
    ),
    (
        "timeout a boolean",
        plan(task("a", timeout_seconds=True)),
        {("$.tasks[0].timeout_seconds", E.WRONG_TYPE)},
    ),
    (
        "timeout zero",
        plan(task("a", timeout_seconds=0)),
        {("$.tasks[0].timeout_seconds", E.INVALID_VALUE)},
    ),
    (
        "max_retries negative",
        plan(task("a", max_retries=-1)),
        {("$.tasks[0].max_retries", E.INVALID_VALUE)},
    ),
    (
        "max_retries a boolean",
        plan(task("a", max_retries=False)),
        {("$.tasks[0].max_retries", E.WRONG_TYPE)},
    ),
    ("NUL in name", plan(task("a"), name="a\x00b"), {("$.name", E.INVALID_VALUE)}),
    (
        "intent_id with surrounding whitespace",
        plan(task("a"), intent_id=" i "),
        {("$.intent_id", E.INVALID_VALUE)},
    ),
    (
        "intent_id with a control character",
        plan(task("a"), intent_id="i\n2"),
        {("$.intent_id", E.INVALID_VALUE)},
    ),
    (
        "integer parameter beyond 2^53",
        plan(task("a", parameters={"big": 2**53 + 1, "ok": -(2**53), "f": 1e300})),
        {("$.tasks[0].parameters.big", E.INVALID_VALUE)},
    ),
    (
        "NUL in description",
        plan(task("a", description="\x00")),
        {("$.tasks[0].description", E.INVALID_VALUE)},
    ),
    (
        "NUL in a parameter string and key",
        plan(task("a", parameters={"x": ["ok", "a\x00"], "k\x00": 1})),
        {
            ("$.tasks[0].parameters.x[1]", E.INVALID_VALUE),
            ('$.tasks[0].parameters["k\\u0000"]', E.INVALID_VALUE),
        },
    ),
    # A JSON "\ud800" escape decodes to a lone surrogate, which has no UTF-8 form.
    ("lone surrogate in name", plan(task("a"), name="a\ud800b"), {("$.name", E.INVALID_VALUE)}),
    (
        "lone surrogate in intent_id",
        plan(task("a"), intent_id="\udc00"),
        {("$.intent_id", E.INVALID_VALUE)},
    ),
    (
        "lone surrogate in description",
        plan(task("a", description="\udfff")),
        {("$.tasks[0].description", E.INVALID_VALUE)},
    ),
    (
        "lone surrogate in a parameter string and key",
        plan(task("a", parameters={"x": ["ok", "a\ud800"], "\ud800": 1})),
        {
            ("$.tasks[0].parameters.x[1]", E.INVALID_VALUE),
            ('$.tasks[0].parameters["\\ud800"]', E.INVALID_VALUE),
        },
    ),
    # -- ids and dependencies across tasks
    (
        "duplicate task id",
        plan(task("a"), task("b"), task("a")),
        {("$.tasks[2].task_id", E.DUPLICATE_TASK_ID)},
    ),
    (
        "dependency on a task whose id is invalid reports only that id",
        plan({"task_id": "a b", "task_type": "echo"}, task("c", "a b")),
        {("$.tasks[0].task_id", E.INVALID_VALUE)},
    ),
    (
        "unknown dependency",
        plan(task("a"), task("b", "a", "zz")),
        {("$.tasks[1].depends_on[1]", E.UNKNOWN_DEPENDENCY)},
    ),
    ("self dependency", plan(task("a", "a")), {("$.tasks[0].depends_on[0]", E.SELF_DEPENDENCY)}),
    (
        "two-task cycle",
        plan(task("a", "b"), task("b", "a")),
        {("$.tasks[0].depends_on[0]", E.CYCLE)},
    ),
    (
        "three-task cycle reported at its first task's edge",
        plan(task("x"), task("c", "a"), task("a", "x", "b"), task("b", "c")),
        {("$.tasks[1].depends_on[0]", E.CYCLE)},
    ),
    (
        "two separate cycles",
        plan(task("a", "b"), task("b", "a"), task("c", "d"), task("d", "c")),
        {("$.tasks[0].depends_on[0]", E.CYCLE), ("$.tasks[2].depends_on[0]", E.CYCLE)},
    ),
]

LIMIT_CASES: list[tuple[str, object, set[tuple[str, IssueCode]]]] = [
    (
        "too many tasks",
        plan(task("a"), task("b"), task("c"), task("d")),
        {("$.tasks", E.LIMIT_EXCEEDED)},
    ),
    (
        "dag too deep",
        plan(task("a"), task("b", "a"), task("c", "b")),
        {("$.tasks[2].depends_on", E.LIMIT_EXCEEDED)},
    ),
    (
        "parameters too large",
        plan(task("a", parameters={"cmd": "x" * 30})),
        {("$.tasks[0].parameters", E.LIMIT_EXCEEDED)},
    ),
    (
        "parameters measured in UTF-8 bytes, not characters",
        plan(task("a", parameters={"c": "é" * 7})),  # {"c":"éé…"}: 15 characters, 22 bytes
        {("$.tasks[0].parameters", E.LIMIT_EXCEEDED)},
    ),
    (
        "parameters nested too deep",
        plan(task("a", parameters={"x": {"y": {}}})),
        {("$.tasks[0].parameters.x.y", E.LIMIT_EXCEEDED)},
    ),
    ("id too long", plan(task("abcdefghi")), {("$.tasks[0].task_id", E.LIMIT_EXCEEDED)}),
    ("plan_id too long", plan(task("a"), plan_id="p" * 9), {("$.plan_id", E.LIMIT_EXCEEDED)}),
    ("intent_id too long", plan(task("a"), intent_id="i" * 9), {("$.intent_id", E.LIMIT_EXCEEDED)}),
    ("name too long", plan(task("a"), name="n" * 6), {("$.name", E.LIMIT_EXCEEDED)}),
    (
        "description too long",
        plan(task("a", description="d" * 5)),
        {("$.tasks[0].description", E.LIMIT_EXCEEDED)},
    ),
    (
        "task_type too long",
        plan({"task_id": "a", "task_type": "t" * 7}),
        {("$.tasks[0].task_type", E.LIMIT_EXCEEDED)},
    ),
    (
        "capability too long",
        plan(task("a", required_capabilities=["c" * 5])),
        {("$.tasks[0].required_capabilities[0]", E.LIMIT_EXCEEDED)},
    ),
    (
        "too many capabilities",
        plan(task("a", required_capabilities=["a", "b", "c"])),
        {("$.tasks[0].required_capabilities", E.LIMIT_EXCEEDED)},
    ),
    (
        "too many dependencies",
        plan(task("a"), task("b"), task("c", "a", "b")),
        {("$.tasks[2].depends_on", E.LIMIT_EXCEEDED)},
    ),
    (
        "timeout above limit",
        plan(task("a", timeout_seconds=61)),
        {("$.tasks[0].timeout_seconds", E.LIMIT_EXCEEDED)},
    ),
    (
        "max_retries above limit",
        plan(task("a", max_retries=4)),
        {("$.tasks[0].max_retries", E.LIMIT_EXCEEDED)},
    ),
]


@pytest.mark.parametrize(
    ("raw", "expected"), [(r, e) for _, r, e in ERROR_CASES], ids=[c[0] for c in ERROR_CASES]
)
def test_each_rule_reports_exactly_its_problem(
    raw: object, expected: set[tuple[str, IssueCode]]
) -> None:
    result = PlanValidator().validate(raw)

    assert isinstance(result, InvalidPlan)
    assert issues_of(result) == expected
    assert all(issue.severity is Severity.ERROR for issue in result.errors)


@pytest.mark.parametrize(
    ("raw", "expected"), [(r, e) for _, r, e in LIMIT_CASES], ids=[c[0] for c in LIMIT_CASES]
)
def test_each_limit_reports_exactly_its_problem(
    raw: object, expected: set[tuple[str, IssueCode]]
) -> None:
    result = PlanValidator(limits=SMALL).validate(raw)

    assert isinstance(result, InvalidPlan)
    assert issues_of(result) == expected


def test_capabilities_may_use_plus_like_the_registry() -> None:
    result = PlanValidator().validate(plan(task("a", required_capabilities=["c++", "gpu:a100"])))

    assert isinstance(result, ValidPlan)
    assert result.plan.tasks[0].required_capabilities == ("c++", "gpu:a100")


def test_limits_admit_values_at_the_limit() -> None:
    raw = plan(
        task("a1234567", parameters={"c": "x" * 12}, timeout_seconds=60, max_retries=3),
        task("b", "a1234567", required_capabilities=["abcd", "efgh"], description="dddd"),
        {"task_id": "c", "task_type": "tttttt"},
        plan_id="p" * 8,
        intent_id="i" * 8,
        name="n" * 5,
    )

    result = PlanValidator(limits=SMALL).validate(raw)

    assert isinstance(result, ValidPlan), result


def test_every_problem_is_reported_at_once() -> None:
    raw = {
        "name": 1,
        "priority": "SOON",
        "tasks": [
            task("a", "b"),
            task("b", "c", "zz", "b"),
            {"task_id": "c", "task_type": "x", "depends_on": ["a"], "timeout_seconds": -5},
            5,
            {"task_id": "a", "tasks_type": 1},
        ],
    }

    result = PlanValidator().validate(raw)

    assert isinstance(result, InvalidPlan)
    assert issues_of(result) == {
        ("$.name", E.WRONG_TYPE),
        ("$.priority", E.INVALID_VALUE),
        ("$.tasks[1].depends_on[1]", E.UNKNOWN_DEPENDENCY),
        ("$.tasks[1].depends_on[2]", E.SELF_DEPENDENCY),
        ("$.tasks[2].timeout_seconds", E.INVALID_VALUE),
        ("$.tasks[3]", E.WRONG_TYPE),
        ("$.tasks[4].tasks_type", E.UNKNOWN_FIELD),
        ("$.tasks[4].task_type", E.REQUIRED),
        ("$.tasks[4].task_id", E.DUPLICATE_TASK_ID),
        ("$.tasks[0].depends_on[0]", E.CYCLE),
    }


def test_cycle_message_names_the_cycle_path() -> None:
    raw = plan(task("x"), task("c", "a"), task("a", "x", "b"), task("b", "c"))

    result = PlanValidator().validate(raw)

    assert isinstance(result, InvalidPlan)
    [cycle] = result.errors
    assert cycle.message == "dependency cycle: c -> a -> b -> c (each task waits for the next)"
    assert cycle.path == "$.tasks[1].depends_on[0]"


def test_shortest_cycle_is_reported_when_a_component_has_several() -> None:
    # a -> b -> a and a -> c -> d -> a share a; the report shows the short one.
    raw = plan(task("a", "c", "b"), task("b", "a"), task("c", "d"), task("d", "a"))

    result = PlanValidator().validate(raw)

    assert isinstance(result, InvalidPlan)
    [cycle] = result.errors
    assert "dependency cycle: a -> b -> a" in cycle.message
    assert cycle.path == "$.tasks[0].depends_on[1]"


def test_duplicate_message_points_to_first_use() -> None:
    result = PlanValidator().validate(plan(task("a"), task("a")))

    assert isinstance(result, InvalidPlan)
    assert result.errors[0].message == "task id 'a' is already used by $.tasks[0]"


def test_depth_message_shows_the_chain() -> None:
    raw = plan(*[task(f"t{i}", *([f"t{i - 1}"] if i else [])) for i in range(10)])

    result = PlanValidator(limits=PlanLimits(max_dag_depth=9)).validate(raw)

    assert isinstance(result, InvalidPlan)
    [issue] = result.errors
    assert issue.path == "$.tasks[9].depends_on"
    assert "chain of 10 tasks exceeds the depth limit of 9" in issue.message
    assert "t9 -> t8 -> t7 -> t6 -> t5 -> t4 -> ..." in issue.message


def test_depth_at_the_limit_is_fine() -> None:
    raw = plan(*[task(f"t{i}", *([f"t{i - 1}"] if i else [])) for i in range(9)])

    assert isinstance(PlanValidator(limits=PlanLimits(max_dag_depth=9)).validate(raw), ValidPlan)


def test_long_chains_do_not_hit_the_recursion_limit() -> None:
    n = 5000
    raw = plan(*[task(f"t{i}", *([f"t{i - 1}"] if i else [])) for i in range(n)])
    raw["tasks"][0]["depends_on"] = [f"t{n - 1}"]  # closes one huge cycle

    result = PlanValidator(limits=PlanLimits(max_dag_depth=n)).validate(raw)

    assert isinstance(result, InvalidPlan)
    [cycle] = result.errors
    assert cycle.code is E.CYCLE
    assert cycle.message.startswith(f"dependency cycle: t0 -> t{n - 1} -> t{n - 2}")


def test_deeply_nested_parameters_are_reported_not_raised() -> None:
    nested: dict[str, Any] = {}
    cursor = nested
    for _ in range(5000):
        cursor["x"] = {}
        cursor = cursor["x"]

    result = PlanValidator().validate(plan(task("a", parameters=nested)))

    assert isinstance(result, InvalidPlan)
    assert [i.code for i in result.errors] == [E.LIMIT_EXCEEDED]
    assert result.errors[0].path.startswith("$.tasks[0].parameters.x.x")


def test_lone_surrogates_are_reported_with_encodable_paths_and_messages() -> None:
    raw = json.loads(
        '{"\\ud800": 1, "name": "a\\ud800", "tasks": [{"task_id": "\\udfff", '
        '"task_type": "echo", "parameters": {"\\udc00": "\\ud800"}}]}'
    )
    result = PlanValidator().validate(raw)
    assert isinstance(result, InvalidPlan)
    found = {i.path: i.message for i in result.errors}
    assert found["$.name"].startswith("contains an unpaired surrogate")
    assert found['$.tasks[0].parameters["\\udc00"]'].startswith("key: contains an unpaired")
    assert '$["\\ud800"]' in found  # unknown field, path escaped
    assert "$.tasks[0].task_id" in found  # not an id
    # The error answer can be encoded (it used to be a 500 while hashing the plan).
    json.dumps(result.to_error().to_dict(), ensure_ascii=False).encode("utf-8")


def test_whole_number_parameters_are_integers_but_integer_fields_stay_strict() -> None:
    result = PlanValidator().validate(
        plan(task("a", parameters={"n": 30.0, "l": [1.0, 2.5, -0.0], "big": 1e300, "x": 1e2}))
    )
    assert isinstance(result, ValidPlan)
    params = result.plan.tasks[0].parameters
    assert params == {"n": 30, "l": [1, 2.5, 0], "big": 1e300, "x": 100}
    assert [type(v) for v in (params["n"], params["x"], params["big"])] == [int, int, float]
    refused = PlanValidator().validate(plan(task("a", timeout_seconds=30.0, max_retries=1.0)))
    assert issues_of(refused) == {
        ("$.tasks[0].timeout_seconds", E.WRONG_TYPE),
        ("$.tasks[0].max_retries", E.WRONG_TYPE),
    }


def test_valid_plan_builds_typed_plan_with_defaults() -> None:
    raw = {
        "plan_id": "release-1.4",
        "intent_id": "intent-9",
        "name": "release 1.4",
        "priority": "HIGH",
        "tasks": [
            {
                "task_id": "build",
                "task_type": "shell",
                "description": "build wheel",
                "required_capabilities": ["python"],
                "depends_on": [],
                "parameters": {"cmd": "make build"},
                "timeout_seconds": 300,
                "max_retries": 2,
            },
            {
                "task_id": "test",
                "task_type": "shell",
                "required_capabilities": ["python"],
                "depends_on": ["build"],
                "parameters": {"cmd": "make test"},
            },
        ],
    }

    result = PlanValidator(limits=PlanLimits(default_max_retries=1)).validate(raw)

    assert isinstance(result, ValidPlan)
    assert result.warnings == ()
    p = result.plan
    assert p.plan_id == "release-1.4"
    assert p.intent_id == "intent-9"
    assert p.priority is Priority.HIGH
    assert p.task_ids() == ("build", "test")
    build, test = p.tasks
    assert build.timeout_seconds == 300
    assert build.max_retries == 2
    assert build.parameters == {"cmd": "make build"}
    assert test.depends_on == ("build",)
    assert test.timeout_seconds is None
    assert test.max_retries == 1


def test_optional_fields_accept_null_as_absent() -> None:
    raw = {
        "plan_id": None,
        "intent_id": None,
        "name": None,
        "priority": None,
        "tasks": [
            {
                "task_id": "a",
                "task_type": "echo",
                "description": None,
                "required_capabilities": None,
                "depends_on": None,
                "parameters": None,
                "timeout_seconds": None,
                "max_retries": None,
            }
        ],
    }

    result = PlanValidator().validate(raw)

    assert isinstance(result, ValidPlan)
    p = result.plan
    assert (p.plan_id, p.name, p.priority) == (None, "", Priority.NORMAL)
    assert p.tasks[0].parameters == {}


def test_validation_does_not_alias_or_mutate_input() -> None:
    raw = plan(task("a", parameters={"x": [1, 2]}))
    before = copy.deepcopy(raw)

    result = PlanValidator().validate(raw)
    raw["tasks"][0]["parameters"]["x"].append(3)

    assert isinstance(result, ValidPlan)
    assert result.plan.tasks[0].parameters == {"x": [1, 2]}
    raw["tasks"][0]["parameters"]["x"].pop()
    assert raw == before


def test_unknown_fields_can_be_warnings() -> None:
    raw = plan(task("a", color="red"), owner="me")

    result = PlanValidator(unknown_fields=UnknownFieldPolicy.WARNING).validate(raw)

    assert isinstance(result, ValidPlan)
    assert {(w.path, w.code, w.severity) for w in result.warnings} == {
        ("$.owner", E.UNKNOWN_FIELD, Severity.WARNING),
        ("$.tasks[0].color", E.UNKNOWN_FIELD, Severity.WARNING),
    }


# -- capability feasibility ------------------------------------------------------------------

FEASIBILITY_CASES: list[tuple[str, list[list[str]], list[str], set[str]]] = [
    ("offered by one worker", [["python", "shell"]], ["python", "shell"], set()),
    ("no capabilities needed", [], [], set()),
    (
        "missing everywhere",
        [["python"]],
        ["python", "gpu"],
        {"$.tasks[0].required_capabilities[1]"},
    ),
    ("no workers at all", [], ["python"], {"$.tasks[0].required_capabilities[0]"}),
    (
        "offered, but not by one worker",
        [["python"], ["gpu"]],
        ["python", "gpu"],
        {"$.tasks[0].required_capabilities"},
    ),
]


@pytest.mark.parametrize(
    ("workers", "required", "paths"),
    [(w, r, p) for _, w, r, p in FEASIBILITY_CASES],
    ids=[c[0] for c in FEASIBILITY_CASES],
)
@pytest.mark.parametrize("strict", [False, True])
def test_capability_feasibility(
    workers: list[list[str]], required: list[str], paths: set[str], strict: bool
) -> None:
    raw = plan(task("a", required_capabilities=required))

    result = PlanValidator().validate(raw, worker_capabilities=workers, strict=strict)

    problems = result.errors if isinstance(result, InvalidPlan) else ()
    if strict:
        assert {i.path for i in problems} == paths
        assert result.warnings == ()
        assert isinstance(result, ValidPlan) == (not paths)
    else:
        assert isinstance(result, ValidPlan)
        assert {w.path for w in result.warnings} == paths
    reported = list(problems) + list(result.warnings)
    assert all(i.code is E.CAPABILITY_UNAVAILABLE for i in reported)


def test_feasibility_reports_every_task_that_no_single_worker_serves() -> None:
    raw = plan(
        task("a", required_capabilities=["python", "gpu"]),
        task("b", required_capabilities=["gpu", "python"]),
        task("c", required_capabilities=["python", "shell"]),
        task("d", required_capabilities=["gpu", "python"]),
    )
    workers = [["python"], ["gpu"], ["python", "shell"]] * 50

    result = PlanValidator().validate(raw, worker_capabilities=workers)

    assert [w.path for w in result.warnings] == [
        "$.tasks[0].required_capabilities",
        "$.tasks[1].required_capabilities",
        "$.tasks[3].required_capabilities",
    ]


def test_feasibility_is_skipped_without_worker_information() -> None:
    raw = plan(task("a", required_capabilities=["gpu"]))

    assert isinstance(
        PlanValidator().validate(raw, worker_capabilities=None, strict=True), ValidPlan
    )


def test_feasibility_warning_names_the_capability() -> None:
    raw = plan(task("a", required_capabilities=["gpu"]))

    result = PlanValidator().validate(raw, worker_capabilities=[["python"]])

    assert [w.message for w in result.warnings] == ["no live worker offers capability 'gpu'"]
    valid = PlanValidator().validate(raw, worker_capabilities=None)
    elsewhere = PlanValidator().check_feasibility(
        cast(Any, valid), [["python"]], where=" in namespace 'ml'"
    )
    assert [w.message for w in elsewhere.warnings] == [
        "no live worker in namespace 'ml' offers capability 'gpu'"
    ]


# -- the result's error form -------------------------------------------------------------------


def test_invalid_plan_converts_to_invalid_argument_with_paths() -> None:
    raw = plan(task("a", "zz"), task("a"), owner=1)

    result = PlanValidator().validate(raw, worker_capabilities=[])

    assert isinstance(result, InvalidPlan)
    error = result.to_error()
    assert isinstance(error, InvalidArgument)
    assert [(v.field, v.description) for v in error.violations] == [
        ("$.owner", "unknown field; allowed: intent_id, name, plan_id, priority, tasks"),
        ("$.tasks[1].task_id", "task id 'a' is already used by $.tasks[0]"),
        ("$.tasks[0].depends_on[0]", "depends on 'zz', which is not a task of this plan"),
    ]
    assert error.message.startswith("invalid plan: 3 problems; first: $.owner: unknown field")
    body = error.to_dict()
    assert body["error"]["code"] == "INVALID_ARGUMENT"
    json.dumps(body)  # the HTTP layer can send it as is


def test_warnings_travel_in_error_details() -> None:
    raw = plan(task("a", "zz"), owner="me")

    result = PlanValidator(unknown_fields=UnknownFieldPolicy.WARNING).validate(raw)

    assert isinstance(result, InvalidPlan)
    [warning] = result.to_error().details["warnings"]
    assert (warning["field"], warning["code"]) == ("$.owner", "unknown_field")


def test_feasibility_is_checked_on_plans_valid_otherwise() -> None:
    raw = plan(task("a", "zz", required_capabilities=["gpu"]))

    result = PlanValidator().validate(raw, worker_capabilities=[], strict=True)

    assert isinstance(result, InvalidPlan)
    assert [e.code for e in result.errors] == [E.UNKNOWN_DEPENDENCY]
    assert result.warnings == ()


def test_feasibility_checked_afterwards_is_the_same_check() -> None:
    raw = plan(
        task("a", required_capabilities=["python", "gpu"]),
        task("b", required_capabilities=["shell"]),
        owner="me",
    )
    validator = PlanValidator(unknown_fields=UnknownFieldPolicy.WARNING)
    workers = [["python"], ["gpu", "python", "x"]]
    valid = validator.validate(raw)
    assert isinstance(valid, ValidPlan)

    for strict in (False, True):
        at_once = validator.validate(raw, worker_capabilities=workers, strict=strict)
        afterwards = validator.check_feasibility(valid, workers, strict=strict)
        assert afterwards == at_once
        assert isinstance(afterwards, InvalidPlan) is strict


def test_reported_issues_are_bounded() -> None:
    raw = plan(*[task(f"t{i}", "missing") for i in range(30)])

    result = PlanValidator(limits=PlanLimits(max_reported_issues=10)).validate(raw)

    assert isinstance(result, InvalidPlan)
    assert len(result.errors) == 11
    assert result.errors[-1].code is E.TRUNCATED
    assert result.errors[-1].message == "20 more errors not shown"
    # All 30 counted (the message said 10: those shown).
    assert result.to_error().message.startswith("invalid plan: 30 problems")


def test_large_valid_plan_at_the_task_limit() -> None:
    n = 2000
    raw = plan(*[task(f"t{i}", *([f"t{i // 2}"] if i else [])) for i in range(n)])

    result = PlanValidator(limits=PlanLimits(max_tasks=n)).validate(raw)

    assert isinstance(result, ValidPlan)
    assert len(result.plan.tasks) == n
