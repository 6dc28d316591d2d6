"""HTTP: probes, metrics, /api/v1/workers with filters and /api/v1/workers/{id}."""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Any

import pytest

from neuralhive.registry.v1 import registry_service_pb2 as pb

if TYPE_CHECKING:  # conftest is not importable at run time (import mode importlib)
    from conftest import Registry

pytestmark = pytest.mark.service


def auth(metadata: tuple[tuple[str, str], ...]) -> dict[str, str]:
    return dict(metadata)


async def test_probes_and_metrics(registry: Registry) -> None:
    assert (await registry.http.get("/health")).json() == {"status": "ok"}
    ready = await registry.http.get("/ready")
    assert ready.status_code == 200
    assert ready.json()["checks"]["postgresql"]["status"] == "ok"

    worker_id = (await registry.register("w1")).worker.worker_id
    await registry.heartbeat(worker_id, in_flight=1)
    await registry.stub.DiscoverWorkers(
        pb.DiscoverWorkersRequest(required_capabilities=["python"]), metadata=registry.service_md
    )
    await registry.sweep()
    text = (await registry.http.get("/metrics")).text
    assert 'hive_registry_workers{status="HEALTHY"} 1.0' in text
    assert 'hive_registry_workers{status="UNHEALTHY"} 0.0' in text
    assert 'hive_registry_heartbeats_total{outcome="ok"} 1.0' in text
    assert "hive_registry_discovery_seconds_count 1.0" in text
    assert 'hive_registry_worker_events_total{type="REGISTERED"} 1.0' in text


async def test_list_and_get_workers(registry: Registry) -> None:
    workers: dict[str, dict[str, Any]] = {
        "a": {"capabilities": ["python"], "labels": {"zone": "eu"}},
        "b": {"capabilities": ["python", "gpu"], "labels": {"zone": "us"}},
        "c": {"capabilities": ["gpu"], "namespace": "batch"},
    }
    ids = {}
    for name, fields in workers.items():
        ids[name] = (await registry.register(name, **fields)).worker.worker_id
    await registry.heartbeat(ids["b"], in_flight=0, draining=True)
    headers = auth(registry.service_md)

    async def names(params: Any) -> list[str]:
        response = await registry.http.get("/api/v1/workers", params=params, headers=headers)
        assert response.status_code == 200, response.text
        return [w["name"] for w in response.json()["workers"]]

    assert await names({}) == ["c", "a", "b"]
    assert await names({"namespace": "default"}) == ["a", "b"]
    assert await names({"capability": "gpu"}) == ["c", "b"]
    assert await names({"status": "DRAINING"}) == ["b"]
    assert await names([("status", "HEALTHY"), ("status", "draining")]) == ["c", "a", "b"]
    assert await names({"label": "zone=eu"}) == ["a"]

    page = await registry.http.get("/api/v1/workers", params={"page_size": 2}, headers=headers)
    body = page.json()
    assert [w["name"] for w in body["workers"]] == ["c", "a"]
    rest = await names({"page_size": 2, "page_token": body["next_page_token"]})
    assert rest == ["b"]

    bad = await registry.http.get(
        "/api/v1/workers", params={"status": "SLEEPY", "label": "novalue"}, headers=headers
    )
    assert bad.status_code == 400
    bad_fields = {v["field"] for v in bad.json()["error"]["details"]["field_violations"]}
    assert bad_fields == {"query.status[0]", "query.label[0]"}

    one = await registry.http.get(f"/api/v1/workers/{ids['b']}", headers=headers)
    assert one.status_code == 200
    assert one.json()["status"] == "DRAINING"
    assert one.json()["capabilities"] == ["gpu", "python"]

    missing = await registry.http.get(
        "/api/v1/workers/00000000-0000-0000-0000-000000000001", headers=headers
    )
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "NOT_FOUND"
    malformed = await registry.http.get("/api/v1/workers/not-a-uuid", headers=headers)
    assert malformed.status_code == 400
    assert malformed.json()["error"]["details"]["field_violations"][0]["field"] == "worker_id"


async def test_list_refusals_name_query_parameters(registry: Registry) -> None:
    await registry.register("w1", labels={"stack": "dev"})
    headers = auth(registry.service_md)

    async def violations(params: Any) -> list[tuple[str, str]]:
        response = await registry.http.get("/api/v1/workers", params=params, headers=headers)
        assert response.status_code == 400, response.text
        return [
            (v["field"], v["description"])
            for v in response.json()["error"]["details"]["field_violations"]
        ]

    nul = "must not contain NUL (\\u0000) characters"
    # A NUL used to reach PostgreSQL (HTTP 500).
    assert await violations({"label": "zone=\x00"}) == [("query.label[0]", nul)]
    forged = base64.urlsafe_b64encode(b'["default","a\\u0000"]').decode().rstrip("=")
    assert await violations({"page_token": forged}) == [
        ("query.page_token", "is not a token returned by ListWorkers")
    ]
    # A key given twice used to keep the last value silently.
    assert await violations([("label", "stack=nope"), ("label", "stack=dev")]) == [
        ("query.label[1]", "label key 'stack' is given more than once")
    ]
    # Every field is named as a query parameter, whichever check refused it.
    mixed = await violations(
        [
            ("status", "SLEEPY"),
            ("label", "novalue"),
            ("label", "-a=1"),
            ("namespace", "BAD"),
            ("capability", "no spaces"),
            ("page_size", "-1"),
        ]
    )
    assert [field for field, _ in mixed] == [
        "query.status[0]",
        "query.namespace",
        "query.capability",
        "query.page_size",
        "query.label[0]",
        "query.label[1]",
    ]
    # The rule as Register states it: "-x" is refused for its first character.
    assert await violations({"capability": "-x"}) == [
        (
            "query.capability",
            "must be 1-64 characters: letters, digits and . _ : / + - "
            "(starting with a letter or digit)",
        )
    ]


async def test_the_answers_have_the_documented_fields(registry: Registry) -> None:
    # The worker answers had no schema in the OpenAPI document.
    worker_id = (await registry.register("w1", labels={"zone": "eu"})).worker.worker_id
    headers = auth(registry.service_md)
    document = (await registry.http.get("/openapi.json")).json()
    schemas = document["components"]["schemas"]
    worker = schemas["WorkerOut"]
    one = await registry.http.get(f"/api/v1/workers/{worker_id}", headers=headers)
    assert list(one.json()) == list(worker["properties"])
    assert one.json()["status"] in schemas["WorkerStatus"]["enum"]
    page = await registry.http.get("/api/v1/workers", headers=headers)
    assert list(page.json()) == list(schemas["WorkerPage"]["properties"])
    assert page.json()["workers"] == [one.json()]
