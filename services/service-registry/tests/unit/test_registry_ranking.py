"""WorkerRanker: eligibility filter, score formula and the deterministic tie-break."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from service_registry.domain.models import DiscoveryQuery, HealthPolicy, Worker
from service_registry.domain.ranking import RankingWeights, WorkerRanker

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
MakeWorker = Callable[..., Worker]


def query(
    caps: tuple[str, ...] = ("python",),
    labels: dict[str, str] | None = None,
    namespace: str = "default",
    max_results: int = 10,
) -> DiscoveryQuery:
    return DiscoveryQuery(
        required_capabilities=caps,
        label_selector=labels or {},
        namespace=namespace,
        max_results=max_results,
    )


# Each case: worker specs (name -> overrides), the query, and the expected names in order.
RANKING_CASES: list[tuple[str, dict[str, dict[str, Any]], DiscoveryQuery, list[str]]] = [
    (
        "more spare capacity first",
        {"busy": {"in_flight": 3}, "idle": {}, "half": {"in_flight": 2}},
        query(),
        ["idle", "half", "busy"],
    ),
    (
        "spare capacity is a fraction of max_concurrent",
        {"big": {"max_concurrent": 10, "in_flight": 5}, "small": {"max_concurrent": 2}},
        query(),
        ["small", "big"],
    ),
    (
        "better recent success rate first",
        {"flaky": {"success_rate": 0.2}, "solid": {"success_rate": 1.0}},
        query(),
        ["solid", "flaky"],
    ),
    (
        "fresher heartbeat first",
        {"late": {"age": 11}, "fresh": {"age": 1}, "lagging": {"age": 6}},
        query(),
        ["fresh", "lagging", "late"],
    ),
    (
        "capacity outweighs freshness",
        {"late_idle": {"age": 11}, "fresh_busy": {"in_flight": 3}},
        query(),
        ["late_idle", "fresh_busy"],
    ),
    (
        "full, draining, unhealthy and other namespaces are left out",
        {
            "ok": {},
            "full": {"in_flight": 4},
            "over": {"in_flight": 9},
            "draining": {"draining": True},
            "silent": {"age": 16},
            "elsewhere": {"namespace": "other"},
        },
        query(),
        ["ok"],
    ),
    (
        "all required capabilities",
        {
            "py": {"capabilities": ("python",)},
            "py_gpu": {"capabilities": ("gpu", "python")},
            "gpu": {"capabilities": ("gpu",)},
        },
        query(caps=("gpu", "python")),
        ["py_gpu"],
    ),
    (
        "no required capability matches every live worker",
        {"a": {"capabilities": ("x",)}, "b": {"capabilities": ("y",), "in_flight": 1}},
        query(caps=()),
        ["a", "b"],
    ),
    (
        "label selector is equality on every label",
        {
            "a": {"labels": {"zone": "a", "gpu": "yes"}},
            "b": {"labels": {"zone": "b", "gpu": "yes"}},
            "c": {"labels": {"zone": "a"}},
        },
        query(labels={"zone": "a", "gpu": "yes"}),
        ["a"],
    ),
    (
        "max_results keeps the best",
        {"w1": {"in_flight": 1}, "w2": {}, "w3": {"in_flight": 2}},
        query(max_results=2),
        ["w2", "w1"],
    ),
]


@pytest.mark.parametrize(
    ("specs", "q", "expected"),
    [case[1:] for case in RANKING_CASES],
    ids=[case[0] for case in RANKING_CASES],
)
def test_ranking_table(
    policy: HealthPolicy,
    make_worker: MakeWorker,
    specs: dict[str, dict[str, Any]],
    q: DiscoveryQuery,
    expected: list[str],
) -> None:
    now = T0 + timedelta(seconds=20)
    workers = []
    for name, overrides in specs.items():
        overrides = dict(overrides)
        age = overrides.pop("age", 0)
        workers.append(
            make_worker(name, last_heartbeat_at=now - timedelta(seconds=age), **overrides)
        )
    ranked = WorkerRanker(policy=policy).rank(workers, q, now)
    assert [r.worker.name for r in ranked] == expected
    scores = [r.score for r in ranked]
    assert scores == sorted(scores, reverse=True)
    assert all(0.0 <= s <= 1.0 + 1e-9 for s in scores)


def test_score_formula(policy: HealthPolicy, make_worker: MakeWorker) -> None:
    ranker = WorkerRanker(
        policy=policy, weights=RankingWeights(spare_capacity=2, success_rate=1, freshness=1)
    )
    # 1 of 4 slots free, success 0.5, heartbeat 7 s old of 15 s allowed -> freshness 8/15.
    worker = make_worker("w", in_flight=3, success_rate=0.5, last_heartbeat_at=T0)
    score = ranker.score(worker, T0 + timedelta(seconds=7))
    assert score == pytest.approx(0.5 * 0.25 + 0.25 * 0.5 + 0.25 * (8 / 15))
    ranked = ranker.rank([worker], query(), T0 + timedelta(seconds=7))
    assert ranked[0].spare_capacity == 1
    assert ranked[0].score == score


def test_in_flight_above_capacity_ranks_as_full(
    policy: HealthPolicy, make_worker: MakeWorker
) -> None:
    """A heartbeat over max_concurrent is accepted (see the README's Input rules): the
    worker counts as full, neither below a full one nor with negative spare capacity."""
    ranker = WorkerRanker(policy=policy)
    full = make_worker("full", in_flight=4)
    over = make_worker("over", in_flight=999)
    assert over.spare_capacity == 0
    assert ranker.rank_key(over) == ranker.rank_key(full)
    assert ranker.rank([over], query(), T0) == []
    ranked = ranker.rank([over, full], DiscoveryQuery(("python",), {}, "default", 10, True), T0)
    assert {r.worker.name: r.spare_capacity for r in ranked} == {"over": 0, "full": 0}
    assert ranked[0].score == ranked[1].score


def test_rank_key_orders_like_the_score(policy: HealthPolicy, make_worker: MakeWorker) -> None:
    """The stored, clock-free key must order workers exactly as the score does."""
    ranker = WorkerRanker(policy=policy)
    now = T0 + timedelta(seconds=30)
    workers = [
        make_worker(
            f"w{i}",
            in_flight=i % 4,
            success_rate=(i * 37 % 100) / 100,
            last_heartbeat_at=now - timedelta(seconds=(i * 13 % 150) / 10),
        )
        for i in range(60)
    ]
    by_key = sorted(workers, key=lambda w: -ranker.rank_key(w))
    scores = [ranker.score(w, now) for w in by_key]
    assert all(a >= b - 1e-12 for a, b in itertools.pairwise(scores))
    # The difference is the same for every worker at one instant.
    gaps = {round(ranker.score(w, now) - ranker.rank_key(w), 9) for w in workers}
    assert len(gaps) == 1


def test_ties_are_deterministic_and_spread(policy: HealthPolicy, make_worker: MakeWorker) -> None:
    ranker = WorkerRanker(policy=policy)
    ids = [uuid.UUID(int=i * 7919 << 64) for i in range(20)]
    now = T0 + timedelta(seconds=1)
    caps = tuple(f"c{k}" for k in range(20))

    def workers(at: datetime) -> list[Worker]:
        return [
            make_worker(f"w{i}", worker_id=wid, last_heartbeat_at=at, capabilities=caps)
            for i, wid in enumerate(ids)
        ]

    def top(q: DiscoveryQuery, at: datetime) -> str:
        return ranker.rank(workers(at), q, at)[0].worker.name

    # Same request, same interval: same answer, whatever the input order.
    assert top(query(caps=()), now) == top(query(caps=()), now + timedelta(seconds=1))
    same = workers(now)
    assert ranker.rank(list(reversed(same)), query(caps=()), now) == ranker.rank(
        same, query(caps=()), now
    )
    # Other intervals and other kinds of request pick other equal workers.
    by_interval = {top(query(caps=()), now + timedelta(seconds=5 * k)) for k in range(20)}
    by_request = {top(query(caps=(f"c{k}",)), now) for k in range(20)}
    assert len(by_interval) > 5
    assert len(by_request) > 5


@pytest.mark.parametrize(
    "weights",
    [(-1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (float("nan"), 1.0, 1.0), (float("inf"), 1.0, 1.0)],
)
def test_bad_weights_are_refused(weights: tuple[float, float, float]) -> None:
    with pytest.raises(ValueError, match="weights"):
        RankingWeights(*weights)
