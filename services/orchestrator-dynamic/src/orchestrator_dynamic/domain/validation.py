"""C1: plan validation.

``PlanValidator.validate`` takes whatever ``json.loads`` (or anything else) produced and
never raises: it returns a ``ValidPlan`` (the typed plan plus warnings) or an
``InvalidPlan`` listing every problem at once, each with a JSON path such as
``$.tasks[3].depends_on[0]``.

Decisions:
- Unknown fields are errors by default (``UnknownFieldPolicy.ERROR``): a misspelt
  ``depend_on`` silently ignored would run a task before its dependency. They can be
  downgraded to warnings.
- ``null`` for an optional field means "absent"; an empty string is not a valid id.
- Duplicate entries in ``depends_on`` or ``required_capabilities`` are errors.
- Ids (``plan_id``, ``task_id``) are ``[A-Za-z0-9][A-Za-z0-9._:-]*``: they appear in URLs,
  logs and cycle paths such as ``a -> b -> a``.
- Capability feasibility needs one worker that offers *all* of a task's capabilities,
  not merely each capability somewhere; callers that only know the union of live
  capabilities pass it as a single set.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from hive_common.errors import FieldViolation, InvalidArgument
from hive_common.structs import MAX_EXACT_INTEGER, whole_numbers_as_integers
from orchestrator_dynamic.domain.graph import find_cycles, longest_chains
from orchestrator_dynamic.domain.plan import JsonValue, Plan, Priority, TaskSpec

ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*")
TASK_TYPE_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9._-]*")
CAPABILITY_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/+-]*")
# PostgreSQL text and jsonb cannot hold U+0000.
_NUL_MESSAGE = "must not contain NUL (U+0000) characters"
# JSON's "\\ud800" escapes decode to lone surrogates, which have no UTF-8 form: such a
# string could be neither hashed, stored nor answered.
_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_MESSAGE = "contains an unpaired surrogate (a lone \\ud800-\\udfff escape)"
_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

PLAN_FIELDS = frozenset({"plan_id", "intent_id", "name", "priority", "tasks"})
TASK_FIELDS = frozenset(
    {
        "task_id",
        "task_type",
        "description",
        "required_capabilities",
        "depends_on",
        "parameters",
        "timeout_seconds",
        "max_retries",
    }
)


class Severity(StrEnum):
    ERROR = "error"
    WARNING = "warning"


class IssueCode(StrEnum):
    REQUIRED = "required"
    WRONG_TYPE = "wrong_type"
    INVALID_VALUE = "invalid_value"
    UNKNOWN_FIELD = "unknown_field"
    DUPLICATE_TASK_ID = "duplicate_task_id"
    DUPLICATE_ENTRY = "duplicate_entry"
    UNKNOWN_DEPENDENCY = "unknown_dependency"
    SELF_DEPENDENCY = "self_dependency"
    CYCLE = "cycle"
    LIMIT_EXCEEDED = "limit_exceeded"
    CAPABILITY_UNAVAILABLE = "capability_unavailable"
    # The registry could not tell (unreachable, too many workers): not a sign of infeasibility.
    FEASIBILITY_UNCHECKED = "feasibility_unchecked"
    TRUNCATED = "truncated"


class UnknownFieldPolicy(StrEnum):
    ERROR = "error"
    WARNING = "warning"


@dataclass(frozen=True, slots=True)
class ValidationIssue:
    path: str
    message: str
    code: IssueCode
    severity: Severity = Severity.ERROR
    # A TRUNCATED issue stands for this many issues not shown.
    omitted: int = 0

    def to_field_violation(self) -> FieldViolation:
        return FieldViolation(field=self.path, description=self.message, omitted=self.omitted)

    def to_json(self) -> dict[str, str]:
        return {"field": self.path, "description": self.message, "code": self.code.value}

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass(frozen=True, slots=True)
class PlanLimits:
    """Configurable bounds; every one of them is checked and reported with its path."""

    max_tasks: int = 10_000
    # Tasks on the longest dependency chain (a task without dependencies has depth 1).
    max_dag_depth: int = 256
    # One task's parameters as the ticket service measures them after the protobuf Struct
    # round trip: compact JSON (no spaces), non-ASCII unescaped, whole numbers within
    # 2^53 as integers (``30.0`` is ``30``), counted in UTF-8 bytes. Keep it at most the
    # ticket service's limit.
    max_parameters_bytes: int = 64 * 1024
    max_parameters_nesting: int = 32
    max_id_length: int = 128
    max_name_length: int = 256
    max_description_length: int = 4000
    max_task_type_length: int = 64
    max_capability_length: int = 64
    max_capabilities_per_task: int = 32
    max_dependencies_per_task: int = 200
    max_timeout_seconds: int = 7 * 24 * 3600
    max_retries: int = 20
    default_max_retries: int = 0
    # Beyond this many issues the rest are summarised in one TRUNCATED issue, which keeps
    # error responses (and gRPC trailers) bounded.
    max_reported_issues: int = 500


@dataclass(frozen=True, slots=True)
class ValidPlan:
    plan: Plan
    warnings: tuple[ValidationIssue, ...] = ()


@dataclass(frozen=True, slots=True)
class InvalidPlan:
    errors: tuple[ValidationIssue, ...]
    warnings: tuple[ValidationIssue, ...] = ()

    def to_error(self) -> InvalidArgument:
        count = sum(e.omitted or 1 for e in self.errors)
        noun = "problem" if count == 1 else "problems"
        return InvalidArgument(
            f"invalid plan: {count} {noun}" + (f"; first: {self.errors[0]}" if count else ""),
            violations=[issue.to_field_violation() for issue in self.errors],
            details={"warnings": [w.to_json() for w in self.warnings]} if self.warnings else {},
        )


PlanValidationResult = ValidPlan | InvalidPlan


def json_type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return f"non-JSON value ({type(value).__name__})"


# Compact JSON, non-ASCII as is: its UTF-8 length is a task's parameters' size.
_compact_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def is_valid_id(value: str) -> bool:
    """Whether ``value`` has the form of a plan or task id (lengths aside): an id that
    has not can never be stored, so looking it up is simply "not found"."""
    return ID_PATTERN.fullmatch(value) is not None


def has_surrogate(value: str) -> bool:
    """Whether ``value`` holds a lone UTF-16 surrogate (it then has no UTF-8 form)."""
    return _SURROGATE.search(value) is not None


def child(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    if _PLAIN_KEY.fullmatch(key):
        return f"{path}.{key}"
    # A key with a lone surrogate is shown escaped: the path must be encodable as UTF-8.
    return f"{path}[{json.dumps(key, ensure_ascii=has_surrogate(key))}]"


def _shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Issues:
    def __init__(self, unknown_fields: UnknownFieldPolicy) -> None:
        self.errors: list[ValidationIssue] = []
        self.warnings: list[ValidationIssue] = []
        self._unknown_fields = unknown_fields

    def error(self, path: str, code: IssueCode, message: str) -> None:
        self.errors.append(ValidationIssue(path, message, code, Severity.ERROR))

    def warn(self, path: str, code: IssueCode, message: str) -> None:
        self.warnings.append(ValidationIssue(path, message, code, Severity.WARNING))

    def unknown_field(self, path: str, allowed: Collection[str]) -> None:
        message = "unknown field; allowed: " + ", ".join(sorted(allowed))
        if self._unknown_fields is UnknownFieldPolicy.ERROR:
            self.error(path, IssueCode.UNKNOWN_FIELD, message)
        else:
            self.warn(path, IssueCode.UNKNOWN_FIELD, message + " (ignored)")


@dataclass(slots=True)
class _TaskDraft:
    """What could be read from one task entry; None where the field was unusable."""

    index: int
    path: str
    task_id: str | None = None
    # The task_id as given when it was a string, valid or not.
    raw_task_id: str | None = None
    task_type: str | None = None
    description: str = ""
    # (position in the array, value) for every usable entry.
    required_capabilities: tuple[tuple[int, str], ...] = ()
    depends_on: tuple[tuple[int, str], ...] = ()
    parameters: dict[str, JsonValue] | None = None
    timeout_seconds: int | None = None
    max_retries: int = 0


class PlanValidator:
    """Validates raw plan input against configurable ``PlanLimits``.

    ``validate`` returns a ``ValidPlan`` or an ``InvalidPlan``; it never raises for bad
    input, whatever its type.
    """

    def __init__(
        self,
        *,
        limits: PlanLimits | None = None,
        unknown_fields: UnknownFieldPolicy = UnknownFieldPolicy.ERROR,
    ) -> None:
        self._limits = limits or PlanLimits()
        self._unknown_fields = unknown_fields

    @property
    def limits(self) -> PlanLimits:
        return self._limits

    def validate(
        self,
        raw: object,
        *,
        worker_capabilities: Iterable[Collection[str]] | None = None,
        strict: bool = False,
    ) -> PlanValidationResult:
        """Check ``raw`` (decoded JSON) and build the plan.

        ``worker_capabilities``: the capability set of each live worker; None skips the
        feasibility check (made on a plan valid otherwise, see :meth:`check_feasibility`).
        Infeasible capabilities are warnings, errors when ``strict``.
        """
        issues = _Issues(self._unknown_fields)
        plan = self._check(raw, issues)
        errors = self._bounded(issues.errors)
        warnings = self._bounded(issues.warnings)
        if errors or plan is None:
            return InvalidPlan(errors=errors, warnings=warnings)
        valid = ValidPlan(plan=plan, warnings=warnings)
        if worker_capabilities is None:
            return valid
        return self.check_feasibility(valid, worker_capabilities, strict=strict)

    def check_feasibility(
        self,
        valid: ValidPlan,
        worker_capabilities: Iterable[Collection[str]],
        *,
        strict: bool = False,
        where: str = "",
    ) -> PlanValidationResult:
        """The feasibility check of :meth:`validate`, for a plan that passed ``validate``
        without one: the caller can then ask the registry about just the capability sets
        the plan needs. ``worker_capabilities`` are capability sets of live workers; the
        result is the same as with every live worker's set as long as it holds, for each
        set a task requires, one that covers it if any worker's does, and otherwise, for
        each capability of it that some worker has, one such worker's set. ``where``: where
        the workers were looked for, as the messages say it (``in_namespace``)."""
        issues = _Issues(self._unknown_fields)
        drafts = [
            _TaskDraft(
                index=i,
                path=child("$.tasks", i),
                required_capabilities=tuple(enumerate(task.required_capabilities)),
            )
            for i, task in enumerate(valid.plan.tasks)
        ]
        self._feasibility(drafts, worker_capabilities, strict, issues, where)
        warnings = valid.warnings + self._bounded(issues.warnings)
        if issues.errors:
            return InvalidPlan(errors=self._bounded(issues.errors), warnings=warnings)
        return ValidPlan(plan=valid.plan, warnings=warnings)

    def _bounded(self, issues: list[ValidationIssue]) -> tuple[ValidationIssue, ...]:
        limit = max(self._limits.max_reported_issues, 1)
        if len(issues) <= limit:
            return tuple(issues)
        kept = issues[:limit]
        rest = len(issues) - limit
        kept.append(
            ValidationIssue(
                "$",
                f"{rest} more {issues[0].severity.value}s not shown",
                IssueCode.TRUNCATED,
                issues[0].severity,
                omitted=rest,
            )
        )
        return tuple(kept)

    # -- top level -----------------------------------------------------------------

    def _check(self, raw: object, issues: _Issues) -> Plan | None:
        lim = self._limits
        if not isinstance(raw, dict):
            issues.error(
                "$", IssueCode.WRONG_TYPE, f"a plan must be an object, got {json_type_name(raw)}"
            )
            return None
        body = self._string_keyed(raw, "$", issues)
        for key in body:
            if key not in PLAN_FIELDS:
                issues.unknown_field(child("$", key), PLAN_FIELDS)

        plan_id = self._optional_id(body, "plan_id", "$", issues)
        intent_id = self._optional_string(body, "intent_id", "$", lim.max_id_length, issues)
        if intent_id is not None and (
            intent_id != intent_id.strip() or any(ord(c) < 32 or ord(c) == 127 for c in intent_id)
        ):
            issues.error(
                "$.intent_id",
                IssueCode.INVALID_VALUE,
                "must not contain control characters or surrounding whitespace",
            )
            intent_id = None
        name = self._optional_string(body, "name", "$", lim.max_name_length, issues)
        priority = self._priority(body, issues)
        drafts = self._tasks(body, issues)
        if drafts is None:
            return None

        self._cross_task_checks(drafts, issues)
        if issues.errors:
            return None
        tasks = tuple(
            TaskSpec(
                task_id=d.task_id or "",
                task_type=d.task_type or "",
                description=d.description,
                required_capabilities=tuple(cap for _, cap in d.required_capabilities),
                depends_on=tuple(dep for _, dep in d.depends_on),
                parameters=d.parameters or {},
                timeout_seconds=d.timeout_seconds,
                max_retries=d.max_retries,
            )
            for d in drafts
        )
        return Plan(
            tasks=tasks,
            plan_id=plan_id,
            intent_id=intent_id or "",
            name=name or "",
            priority=priority,
        )

    @staticmethod
    def _string_keyed(raw: dict[Any, Any], path: str, issues: _Issues) -> dict[str, Any]:
        body: dict[str, Any] = {}
        for key, value in raw.items():
            if isinstance(key, str):
                body[key] = value
            else:
                issues.error(
                    path, IssueCode.WRONG_TYPE, f"object keys must be strings, got {key!r}"
                )
        return body

    def _optional_string(
        self, body: Mapping[str, Any], key: str, path: str, max_length: int, issues: _Issues
    ) -> str | None:
        value = body.get(key)
        if value is None:
            return None
        field_path = child(path, key)
        if not isinstance(value, str):
            issues.error(
                field_path, IssueCode.WRONG_TYPE, f"must be a string, got {json_type_name(value)}"
            )
            return None
        if len(value) > max_length:
            issues.error(
                field_path,
                IssueCode.LIMIT_EXCEEDED,
                f"is {len(value)} characters long; the limit is {max_length}",
            )
            return None
        if "\x00" in value:
            issues.error(field_path, IssueCode.INVALID_VALUE, _NUL_MESSAGE)
            return None
        if has_surrogate(value):
            issues.error(field_path, IssueCode.INVALID_VALUE, _SURROGATE_MESSAGE)
            return None
        return value

    def _id_value(
        self, value: object, path: str, issues: _Issues, *, what: str = "an id"
    ) -> str | None:
        if not isinstance(value, str):
            issues.error(
                path, IssueCode.WRONG_TYPE, f"must be a string, got {json_type_name(value)}"
            )
            return None
        if not value:
            issues.error(path, IssueCode.INVALID_VALUE, f"{what} must not be empty")
            return None
        if len(value) > self._limits.max_id_length:
            issues.error(
                path,
                IssueCode.LIMIT_EXCEEDED,
                f"is {len(value)} characters long; the limit is {self._limits.max_id_length}",
            )
            return None
        if not ID_PATTERN.fullmatch(value):
            issues.error(
                path,
                IssueCode.INVALID_VALUE,
                f"{_shorten(repr(value))} is not a valid id: use letters, digits and . _ : -, "
                "starting with a letter or digit",
            )
            return None
        return value

    def _optional_id(
        self, body: Mapping[str, Any], key: str, path: str, issues: _Issues
    ) -> str | None:
        value = body.get(key)
        if value is None:
            return None
        return self._id_value(value, child(path, key), issues)

    def _priority(self, body: Mapping[str, Any], issues: _Issues) -> Priority:
        value = body.get("priority")
        if value is None:
            return Priority.NORMAL
        allowed = ", ".join(p.value for p in Priority)
        if not isinstance(value, str):
            issues.error(
                "$.priority",
                IssueCode.WRONG_TYPE,
                f"must be a string ({allowed}), got {json_type_name(value)}",
            )
            return Priority.NORMAL
        try:
            return Priority(value)
        except ValueError:
            issues.error(
                "$.priority",
                IssueCode.INVALID_VALUE,
                f"{_shorten(repr(value))} is not a priority; use one of {allowed}",
            )
            return Priority.NORMAL

    def _tasks(self, body: Mapping[str, Any], issues: _Issues) -> list[_TaskDraft] | None:
        if "tasks" not in body or body["tasks"] is None:
            issues.error("$.tasks", IssueCode.REQUIRED, "is required: a list of tasks")
            return None
        raw_tasks = body["tasks"]
        if not isinstance(raw_tasks, list):
            issues.error(
                "$.tasks",
                IssueCode.WRONG_TYPE,
                f"must be an array of tasks, got {json_type_name(raw_tasks)}",
            )
            return None
        if not raw_tasks:
            issues.error("$.tasks", IssueCode.INVALID_VALUE, "a plan needs at least one task")
            return None
        if len(raw_tasks) > self._limits.max_tasks:
            issues.error(
                "$.tasks",
                IssueCode.LIMIT_EXCEEDED,
                f"has {len(raw_tasks)} tasks; the limit is {self._limits.max_tasks}",
            )
        return [self._task(i, raw, issues) for i, raw in enumerate(raw_tasks)]

    # -- one task --------------------------------------------------------------------

    def _task(self, index: int, raw: object, issues: _Issues) -> _TaskDraft:
        lim = self._limits
        path = child("$.tasks", index)
        draft = _TaskDraft(index=index, path=path)
        if not isinstance(raw, dict):
            issues.error(
                path, IssueCode.WRONG_TYPE, f"a task must be an object, got {json_type_name(raw)}"
            )
            return draft
        body = self._string_keyed(raw, path, issues)
        for key in body:
            if key not in TASK_FIELDS:
                issues.unknown_field(child(path, key), TASK_FIELDS)

        if body.get("task_id") is None:
            issues.error(child(path, "task_id"), IssueCode.REQUIRED, "is required")
        else:
            if isinstance(body["task_id"], str):
                draft.raw_task_id = body["task_id"]
            draft.task_id = self._id_value(
                body["task_id"], child(path, "task_id"), issues, what="a task id"
            )

        draft.task_type = self._task_type(body, path, issues)
        draft.description = (
            self._optional_string(body, "description", path, lim.max_description_length, issues)
            or ""
        )
        draft.required_capabilities = self._capabilities(body, path, issues)
        draft.depends_on = self._depends_on(body, path, issues)
        draft.parameters = self._parameters(body, path, issues)
        draft.timeout_seconds = self._optional_int(
            body, "timeout_seconds", path, 1, lim.max_timeout_seconds, issues
        )
        retries = self._optional_int(body, "max_retries", path, 0, lim.max_retries, issues)
        draft.max_retries = lim.default_max_retries if retries is None else retries
        return draft

    def _task_type(self, body: Mapping[str, Any], path: str, issues: _Issues) -> str | None:
        field_path = child(path, "task_type")
        value = body.get("task_type")
        if value is None:
            issues.error(field_path, IssueCode.REQUIRED, "is required")
            return None
        if not isinstance(value, str):
            issues.error(
                field_path, IssueCode.WRONG_TYPE, f"must be a string, got {json_type_name(value)}"
            )
            return None
        limit = self._limits.max_task_type_length
        if len(value) > limit:
            issues.error(
                field_path,
                IssueCode.LIMIT_EXCEEDED,
                f"is {len(value)} characters long; the limit is {limit}",
            )
            return None
        if not TASK_TYPE_PATTERN.fullmatch(value):
            issues.error(
                field_path,
                IssueCode.INVALID_VALUE,
                f"{_shorten(repr(value))} is not a valid task type: use letters, digits "
                "and . _ -, starting with a letter",
            )
            return None
        return value

    def _string_list(
        self, body: Mapping[str, Any], key: str, path: str, max_items: int, issues: _Issues
    ) -> list[tuple[int, str]] | None:
        """The string entries of an optional array, with their positions; type errors,
        duplicates and the length limit reported. None if the array itself is unusable."""
        value = body.get(key)
        if value is None:
            return []
        field_path = child(path, key)
        if not isinstance(value, list):
            issues.error(
                field_path,
                IssueCode.WRONG_TYPE,
                f"must be an array of strings, got {json_type_name(value)}",
            )
            return None
        if len(value) > max_items:
            issues.error(
                field_path,
                IssueCode.LIMIT_EXCEEDED,
                f"has {len(value)} entries; the limit is {max_items}",
            )
        entries: list[tuple[int, str]] = []
        first_seen: dict[str, int] = {}
        for i, item in enumerate(value):
            # Paths are built for errors only: a plan may hold a million entries.
            if not isinstance(item, str):
                issues.error(
                    child(field_path, i),
                    IssueCode.WRONG_TYPE,
                    f"must be a string, got {json_type_name(item)}",
                )
                continue
            if item in first_seen:
                issues.error(
                    child(field_path, i),
                    IssueCode.DUPLICATE_ENTRY,
                    f"{_shorten(repr(item))} is already listed at "
                    f"{child(field_path, first_seen[item])}",
                )
                continue
            first_seen[item] = i
            entries.append((i, item))
        return entries

    def _capabilities(
        self, body: Mapping[str, Any], path: str, issues: _Issues
    ) -> tuple[tuple[int, str], ...]:
        lim = self._limits
        entries = self._string_list(
            body, "required_capabilities", path, lim.max_capabilities_per_task, issues
        )
        if entries is None:
            return ()
        field_path = child(path, "required_capabilities")
        capabilities: list[tuple[int, str]] = []
        for i, capability in entries:
            item_path = child(field_path, i)
            if not capability:
                issues.error(item_path, IssueCode.INVALID_VALUE, "a capability must not be empty")
            elif len(capability) > lim.max_capability_length:
                issues.error(
                    item_path,
                    IssueCode.LIMIT_EXCEEDED,
                    f"is {len(capability)} characters long; the limit is "
                    f"{lim.max_capability_length}",
                )
            elif not CAPABILITY_PATTERN.fullmatch(capability):
                issues.error(
                    item_path,
                    IssueCode.INVALID_VALUE,
                    f"{_shorten(repr(capability))} is not a valid capability: use letters, "
                    "digits and . _ : / + -, starting with a letter or digit",
                )
            else:
                capabilities.append((i, capability))
        return tuple(capabilities)

    def _depends_on(
        self, body: Mapping[str, Any], path: str, issues: _Issues
    ) -> tuple[tuple[int, str], ...]:
        entries = self._string_list(
            body, "depends_on", path, self._limits.max_dependencies_per_task, issues
        )
        return tuple(entries or ())

    def _optional_int(
        self,
        body: Mapping[str, Any],
        key: str,
        path: str,
        minimum: int,
        maximum: int,
        issues: _Issues,
    ) -> int | None:
        value = body.get(key)
        if value is None:
            return None
        field_path = child(path, key)
        # bool is an int subclass in Python; JSON true is not a number.
        if isinstance(value, bool) or not isinstance(value, int):
            issues.error(
                field_path,
                IssueCode.WRONG_TYPE,
                f"must be an integer, got {json_type_name(value)}",
            )
            return None
        if value < minimum or value > maximum:
            issues.error(
                field_path,
                IssueCode.INVALID_VALUE if value < minimum else IssueCode.LIMIT_EXCEEDED,
                f"must be between {minimum} and {maximum}, got {value}",
            )
            return None
        return value

    def _parameters(
        self, body: Mapping[str, Any], path: str, issues: _Issues
    ) -> dict[str, JsonValue] | None:
        lim = self._limits
        value = body.get("parameters")
        if value is None:
            return {}
        field_path = child(path, "parameters")
        if not isinstance(value, dict):
            issues.error(
                field_path, IssueCode.WRONG_TYPE, f"must be an object, got {json_type_name(value)}"
            )
            return None
        before = len(issues.errors)
        # Iterative walk: deep nesting must not hit the recursion limit before it is reported.
        stack: list[tuple[object, str, int]] = [(value, field_path, 1)]
        while stack:
            node, node_path, nesting = stack.pop()
            if isinstance(node, dict | list) and nesting > lim.max_parameters_nesting:
                issues.error(
                    node_path,
                    IssueCode.LIMIT_EXCEEDED,
                    f"parameters nest more than {lim.max_parameters_nesting} levels deep",
                )
                continue
            if isinstance(node, dict):
                # Children pushed in reverse so problems come out in document order.
                for key, item in reversed(node.items()):
                    if not isinstance(key, str):
                        issues.error(
                            node_path,
                            IssueCode.WRONG_TYPE,
                            f"object keys must be strings, got {_shorten(repr(key))}",
                        )
                        continue
                    if "\x00" in key:
                        issues.error(
                            child(node_path, key), IssueCode.INVALID_VALUE, "key: " + _NUL_MESSAGE
                        )
                        continue
                    if has_surrogate(key):
                        issues.error(
                            child(node_path, key),
                            IssueCode.INVALID_VALUE,
                            "key: " + _SURROGATE_MESSAGE,
                        )
                        continue
                    stack.append((item, child(node_path, key), nesting + 1))
            elif isinstance(node, list):
                for i, item in reversed(list(enumerate(node))):
                    stack.append((item, child(node_path, i), nesting + 1))
            elif isinstance(node, str) and "\x00" in node:
                issues.error(node_path, IssueCode.INVALID_VALUE, _NUL_MESSAGE)
            elif isinstance(node, str) and has_surrogate(node):
                issues.error(node_path, IssueCode.INVALID_VALUE, _SURROGATE_MESSAGE)
            elif isinstance(node, float) and not math.isfinite(node):
                issues.error(node_path, IssueCode.INVALID_VALUE, f"{node} is not a JSON number")
            elif (
                isinstance(node, int)
                and not isinstance(node, bool)
                and abs(node) > MAX_EXACT_INTEGER
            ):
                issues.error(
                    node_path,
                    IssueCode.INVALID_VALUE,
                    "integers beyond ±2^53 cannot be passed on exactly (JSON numbers travel as "
                    "doubles); send it as a string",
                )
            elif node is not None and not isinstance(node, str | int | float | bool):
                issues.error(
                    node_path,
                    IssueCode.WRONG_TYPE,
                    f"must be a JSON value, got {json_type_name(node)}",
                )
        if len(issues.errors) > before:
            return None
        # A private deep copy (the plan must not change when the caller's input does: the
        # walk above let only dicts, lists and immutable scalars through), with whole
        # numbers read as integers, as the gRPC twin and the ticket service read them.
        copied = whole_numbers_as_integers(value)
        assert isinstance(copied, dict)
        try:
            encoded = _compact_json(copied)
        except (ValueError, TypeError, RecursionError):  # pragma: no cover - walked above
            issues.error(field_path, IssueCode.INVALID_VALUE, "is not serialisable as JSON")
            return None
        # The ticket service's measure of the same parameters (see PlanLimits).
        size = len(encoded.encode())
        if size > lim.max_parameters_bytes:
            issues.error(
                field_path,
                IssueCode.LIMIT_EXCEEDED,
                f"is {size} bytes as UTF-8 JSON; the limit is {lim.max_parameters_bytes}",
            )
            return None
        return copied

    # -- across tasks ------------------------------------------------------------------

    def _cross_task_checks(self, drafts: list[_TaskDraft], issues: _Issues) -> None:
        first_index: dict[str, int] = {}
        for draft in drafts:
            if draft.task_id is None:
                continue
            if draft.task_id in first_index:
                issues.error(
                    child(draft.path, "task_id"),
                    IssueCode.DUPLICATE_TASK_ID,
                    f"task id {draft.task_id!r} is already used by "
                    f"{child('$.tasks', first_index[draft.task_id])}",
                )
            else:
                first_index[draft.task_id] = draft.index

        invalid_ids = {
            d.raw_task_id for d in drafts if d.task_id is None and d.raw_task_id is not None
        }
        # The graph holds the first task of each id and only edges to known tasks, so the
        # cycle and depth checks below still run when other problems exist.
        nodes: list[str] = []
        edges: dict[str, list[str]] = {}
        for draft in drafts:
            is_node = draft.task_id is not None and first_index[draft.task_id] == draft.index
            if is_node and draft.task_id is not None:
                nodes.append(draft.task_id)
                edges[draft.task_id] = []
            # Paths are built for errors only: a plan may hold a million dependencies.
            for position, dep in draft.depends_on:
                if draft.task_id is not None and dep == draft.task_id:
                    issues.error(
                        child(child(draft.path, "depends_on"), position),
                        IssueCode.SELF_DEPENDENCY,
                        "a task cannot depend on itself",
                    )
                elif dep in invalid_ids:
                    pass  # that task's id is reported already; don't pile on
                elif dep not in first_index:
                    issues.error(
                        child(child(draft.path, "depends_on"), position),
                        IssueCode.UNKNOWN_DEPENDENCY,
                        f"depends on {_shorten(repr(dep))}, which is not a task of this plan",
                    )
                elif is_node and draft.task_id is not None:
                    edges[draft.task_id].append(dep)

        cycles = find_cycles(nodes, edges)
        for cycle in cycles:
            start, nxt = cycle[0], cycle[1]
            first = drafts[first_index[start]]
            position = next(p for p, dep in first.depends_on if dep == nxt)
            path = child(child(first.path, "depends_on"), position)
            issues.error(
                path,
                IssueCode.CYCLE,
                "dependency cycle: " + " -> ".join(cycle) + " (each task waits for the next)",
            )
        if cycles:
            return

        depth, next_hop = longest_chains(nodes, edges)
        limit = self._limits.max_dag_depth
        deepest = max(nodes, key=lambda n: depth[n], default=None)
        if deepest is not None and depth[deepest] > limit:
            chain = [deepest]
            while chain[-1] in next_hop and len(chain) < 6:
                chain.append(next_hop[chain[-1]])
            shown = " -> ".join(chain) + (" -> ..." if chain[-1] in next_hop else "")
            issues.error(
                child(child("$.tasks", first_index[deepest]), "depends_on"),
                IssueCode.LIMIT_EXCEEDED,
                f"dependency chain of {depth[deepest]} tasks exceeds the depth limit of "
                f"{limit}: {shown}",
            )

    def _feasibility(
        self,
        drafts: list[_TaskDraft],
        worker_capabilities: Iterable[Collection[str]],
        strict: bool,
        issues: _Issues,
        where: str,
    ) -> None:
        # Distinct capability sets (workers mostly share a few), and per set of required
        # capabilities whether one of them has it all: 10,000 tasks against 5,000 workers
        # must not compare every task with every worker.
        workers = {frozenset(caps) for caps in worker_capabilities}
        offered: frozenset[str] = frozenset().union(*workers)
        served: dict[frozenset[str], bool] = {}
        report = issues.error if strict else issues.warn
        for draft in drafts:
            required = draft.required_capabilities
            if not required:
                continue
            caps_path = child(draft.path, "required_capabilities")
            missing = [(i, c) for i, c in required if c not in offered]
            for position, capability in missing:
                report(
                    child(caps_path, position),
                    IssueCode.CAPABILITY_UNAVAILABLE,
                    f"no live worker{where} offers capability {capability!r}",
                )
            if missing or len(required) < 2:
                continue
            needed = frozenset(c for _, c in required)
            if needed not in served:
                served[needed] = any(needed <= caps for caps in workers)
            if not served[needed]:
                report(
                    caps_path,
                    IssueCode.CAPABILITY_UNAVAILABLE,
                    f"no single live worker{where} offers all of: "
                    + ", ".join(c for _, c in required),
                )
