"""The execution plan users submit (DESIGN.md section 7) and its canonical content hash.

A ``Plan`` is only ever built by ``PlanValidator`` from checked input, so everything here
can assume well-formed values: unique task ids, known dependencies, no cycles.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeAlias

JsonValue: TypeAlias = "bool | int | float | str | list[JsonValue] | dict[str, JsonValue] | None"


class Priority(StrEnum):
    LOW = "LOW"
    NORMAL = "NORMAL"
    HIGH = "HIGH"
    CRITICAL = "CRITICAL"


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """One task of a plan; becomes one execution ticket."""

    task_id: str
    task_type: str
    description: str = ""
    required_capabilities: tuple[str, ...] = ()
    depends_on: tuple[str, ...] = ()
    parameters: Mapping[str, JsonValue] = field(default_factory=dict)
    # None means "the ticket service's default" (sent as 0 on the wire).
    timeout_seconds: int | None = None
    max_retries: int = 0

    def to_json(self) -> dict[str, JsonValue]:
        body: dict[str, JsonValue] = {
            "task_id": self.task_id,
            "task_type": self.task_type,
            "description": self.description,
            "required_capabilities": list(self.required_capabilities),
            "depends_on": list(self.depends_on),
            "parameters": dict(self.parameters),
            "max_retries": self.max_retries,
        }
        if self.timeout_seconds is not None:
            body["timeout_seconds"] = self.timeout_seconds
        return body


@dataclass(frozen=True, slots=True)
class Plan:
    """A validated plan. ``plan_id`` is None when the client did not choose one."""

    tasks: tuple[TaskSpec, ...]
    plan_id: str | None = None
    intent_id: str = ""
    name: str = ""
    priority: Priority = Priority.NORMAL

    def task_ids(self) -> tuple[str, ...]:
        return tuple(task.task_id for task in self.tasks)

    def with_plan_id(self, plan_id: str) -> Plan:
        return Plan(
            tasks=self.tasks,
            plan_id=plan_id,
            intent_id=self.intent_id,
            name=self.name,
            priority=self.priority,
        )

    def to_json(self) -> dict[str, JsonValue]:
        """The normalised body (defaults filled in), as stored and as hashed."""
        body: dict[str, JsonValue] = {
            "intent_id": self.intent_id,
            "name": self.name,
            "priority": self.priority.value,
            "tasks": [task.to_json() for task in self.tasks],
        }
        if self.plan_id is not None:
            body["plan_id"] = self.plan_id
        return body

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Plan:
        """Rebuild a plan from ``to_json`` output (trusted: it was validated when stored)."""
        tasks = tuple(
            TaskSpec(
                task_id=t["task_id"],
                task_type=t["task_type"],
                description=t.get("description", ""),
                required_capabilities=tuple(t.get("required_capabilities", ())),
                depends_on=tuple(t.get("depends_on", ())),
                parameters=dict(t.get("parameters", {})),
                timeout_seconds=t.get("timeout_seconds"),
                max_retries=t.get("max_retries", 0),
            )
            for t in body["tasks"]
        )
        return cls(
            tasks=tasks,
            plan_id=body.get("plan_id"),
            intent_id=body.get("intent_id", ""),
            name=body.get("name", ""),
            priority=Priority(body.get("priority", Priority.NORMAL.value)),
        )


def canonical_json(value: JsonValue) -> str:
    """Deterministic JSON: sorted keys, no insignificant whitespace, UTF-8 kept as is."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def plan_body_hash(plan: Plan) -> str:
    """SHA-256 of the normalised plan body, excluding ``plan_id``.

    Idempotent submission compares this: key order, whitespace and spelled-out defaults
    do not matter; any change to a task, its order, or plan metadata does. The plan id is
    left out because it is the key the hash is compared under. The hash is computed once
    from the submitted body and stored; it is never recomputed from the JSONB copy (JSONB
    may rewrite numbers such as ``1e2``).
    """
    body = plan.to_json()
    body.pop("plan_id", None)
    digest = hashlib.sha256(canonical_json(body).encode("utf-8")).hexdigest()
    return f"sha256:{digest}"
