"""The validator never raises, whatever it is given (seeded, so failures reproduce)."""

from __future__ import annotations

import copy
import json
import random
from typing import Any

import pytest

from orchestrator_dynamic.domain.plan import plan_body_hash
from orchestrator_dynamic.domain.validation import (
    PLAN_FIELDS,
    TASK_FIELDS,
    InvalidPlan,
    PlanLimits,
    PlanValidator,
    ValidPlan,
)

KEYS = [*sorted(PLAN_FIELDS | TASK_FIELDS), "", "x", "a b", "\x00", "é"]
ODD = [
    float("nan"),
    float("inf"),
    -0.0,
    True,
    False,
    None,
    b"bytes",
    (1, 2),
    {1, 2},
    object(),
    10**40,
    "",
    "\x00",
    "a -> b",
    "NORMAL",
    "echo",
    "t0",
    "t1",
]


def random_value(rng: random.Random, depth: int = 0) -> Any:
    roll = rng.random()
    if depth > 4 or roll < 0.35:
        return rng.choice([*ODD, rng.randint(-5, 5), rng.random(), f"t{rng.randint(0, 3)}"])
    if roll < 0.65:
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    result: dict[Any, Any] = {}
    for _ in range(rng.randint(0, 6)):
        key: Any = rng.choice(KEYS) if rng.random() < 0.9 else rng.choice([1, None, (1,)])
        result[key] = random_value(rng, depth + 1)
    return result


VALID: dict[str, Any] = {
    "plan_id": "p",
    "name": "n",
    "priority": "LOW",
    "tasks": [
        {"task_id": "t0", "task_type": "echo", "parameters": {"a": [1, {"b": None}]}},
        {"task_id": "t1", "task_type": "echo", "depends_on": ["t0"], "max_retries": 1},
        {"task_id": "t2", "task_type": "echo", "depends_on": ["t0", "t1"]},
    ],
}


def mutate(rng: random.Random, value: Any) -> Any:
    """Replace one randomly chosen node of ``value`` with a random value."""
    if not isinstance(value, dict | list) or rng.random() < 0.3:
        return random_value(rng)
    if isinstance(value, list):
        if not value:
            return [random_value(rng)]
        i = rng.randrange(len(value))
        value[i] = mutate(rng, value[i])
        return value
    if not value or rng.random() < 0.1:
        value[rng.choice(KEYS)] = random_value(rng)
        return value
    key = rng.choice(list(value))
    value[key] = mutate(rng, value[key])
    return value


def check(result: ValidPlan | InvalidPlan) -> None:
    if isinstance(result, InvalidPlan):
        assert result.errors
        assert all(issue.path.startswith("$") for issue in result.errors)
        json.dumps(result.to_error().to_dict())
    else:
        plan_body_hash(result.plan)  # a valid plan is always hashable JSON


@pytest.mark.parametrize("seed", range(20))
def test_random_values_never_raise(seed: int) -> None:
    rng = random.Random(seed)
    validator = PlanValidator(limits=PlanLimits(max_tasks=5, max_dag_depth=3))
    for _ in range(200):
        raw = random_value(rng)
        if isinstance(raw, dict) and rng.random() < 0.5:
            raw["tasks"] = [random_value(rng) for _ in range(rng.randint(0, 4))]
        check(validator.validate(raw, worker_capabilities=[["x"]], strict=rng.random() < 0.5))


@pytest.mark.parametrize("seed", range(20))
def test_mutated_valid_plans_never_raise(seed: int) -> None:
    rng = random.Random(1000 + seed)
    validator = PlanValidator()
    assert isinstance(validator.validate(VALID), ValidPlan)
    for _ in range(200):
        raw = copy.deepcopy(VALID)
        for _ in range(rng.randint(1, 3)):
            raw = mutate(rng, raw)
        check(validator.validate(raw, worker_capabilities=None))
