"""scripts/lint_deploy.py passes the repository's deployment files and fails broken copies.

Each broken case starts from a copy of the real files and changes one thing, so a pass on the
real files and a failure on the copy show the checker looks at that very thing.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from hive_testsupport.scripts import load_script

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "scripts" / "lint_deploy.py"


lint_deploy = load_script("lint_deploy.py")


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    """The compose file, the manifests and every Dockerfile, laid out as in the repository."""
    shutil.copy(REPO_ROOT / "docker-compose.yml", tmp_path)
    shutil.copytree(REPO_ROOT / "deploy" / "docker", tmp_path / "deploy" / "docker")
    shutil.copytree(REPO_ROOT / "deploy" / "k8s", tmp_path / "deploy" / "k8s")
    for dockerfile in lint_deploy.default_dockerfiles(REPO_ROOT):
        target = tmp_path / dockerfile.relative_to(REPO_ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(dockerfile, target)
    return tmp_path


def _problems(root: Path, *, only: str | None = None) -> list[str]:
    """Problems in the copy; ``only`` (compose, k8s, docker) limits the run to one kind."""
    report = lint_deploy.run(
        compose=root / "docker-compose.yml" if only in (None, "compose") else None,
        k8s=sorted((root / "deploy" / "k8s").glob("*.yaml")) if only in (None, "k8s") else [],
        dockerfiles=lint_deploy.default_dockerfiles(root) if only in (None, "docker") else [],
    )
    return list(report.problems)


def _edit_text(path: Path, old: str, new: str, *, count: int = 1) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, count))


def _edit_yaml(path: Path, change: Callable[[list[Any]], None]) -> None:
    documents = list(yaml.safe_load_all(path.read_text()))
    change(documents)
    path.write_text(yaml.safe_dump_all(documents, sort_keys=False))


def _container(documents: list[Any], kind: str = "Deployment") -> dict[str, Any]:
    (resource,) = [d for d in documents if d["kind"] == kind]
    container: dict[str, Any] = resource["spec"]["template"]["spec"]["containers"][0]
    return container


TICKETS_K8S = "deploy/k8s/21-execution-ticket-service.yaml"
TICKETS_DOCKERFILE = "services/execution-ticket-service/Dockerfile"


def test_the_repository_files_pass() -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "lint-deploy: ok (compose, " in result.stdout
    assert " 4 Dockerfile(s))" in result.stdout


def test_an_unchanged_copy_passes(copy: Path) -> None:
    assert _problems(copy) == []


def test_the_command_fails_on_a_broken_file(copy: Path) -> None:
    _edit_text(copy / "docker-compose.yml", "healthcheck:", "healthchek:")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--compose", str(copy / "docker-compose.yml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert "'healthchek' was unexpected" in result.stderr


def _drop_mongo_healthcheck(documents: list[Any]) -> None:
    del documents[0]["services"]["mongo"]["healthcheck"]


def _depend_on_unknown(documents: list[Any]) -> None:
    documents[0]["services"]["worker-2"]["depends_on"] = {
        "registry": {"condition": "service_healthy"}
    }


def _missing_dockerfile(documents: list[Any]) -> None:
    documents[0]["services"]["worker-1"]["build"]["dockerfile"] = "deploy/docker/workr.Dockerfile"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        pytest.param(
            lambda root: _edit_text(
                root / "docker-compose.yml", "condition: service_healthy", "condition: healthy"
            ),
            "does not match the Compose Specification schema",
            id="unknown-depends-on-condition",
        ),
        pytest.param(
            lambda root: _edit_text(root / "docker-compose.yml", "    ports:", "    port:"),
            "'port' was unexpected",
            id="misspelt-service-key",
        ),
        pytest.param(
            lambda root: _edit_yaml(root / "docker-compose.yml", _drop_mongo_healthcheck),
            "depends_on 'mongo' with condition service_healthy, but 'mongo' has no healthcheck",
            id="healthy-dependency-without-healthcheck",
        ),
        pytest.param(
            lambda root: _edit_yaml(root / "docker-compose.yml", _depend_on_unknown),
            "depends_on names an undefined service 'registry'",
            id="unknown-dependency",
        ),
        pytest.param(
            lambda root: _edit_yaml(root / "docker-compose.yml", _missing_dockerfile),
            "workr.Dockerfile does not exist",
            id="missing-dockerfile",
        ),
        pytest.param(
            lambda root: _edit_text(
                root / "docker-compose.yml", "${HIVE_LOG_LEVEL:-INFO}", "${HIVE_LOG_LEVEL}"
            ),
            "${HIVE_LOG_LEVEL} has no default",
            id="variable-without-default",
        ),
    ],
)
def test_a_broken_compose_file_fails(
    copy: Path, change: Callable[[Path], None], expected: str
) -> None:
    change(copy)
    problems = _problems(copy, only="compose")
    assert any(expected in problem for problem in problems), problems


def _grpc_port_by_name(documents: list[Any]) -> None:
    _container(documents)["readinessProbe"]["grpc"]["port"] = "grpc"


def _http_readiness(documents: list[Any]) -> None:
    _container(documents)["readinessProbe"] = {"httpGet": {"path": "/ready", "port": 8000}}


def _wrong_grpc_port(documents: list[Any]) -> None:
    _container(documents)["readinessProbe"]["grpc"]["port"] = 50051


def _liveness_elsewhere(documents: list[Any]) -> None:
    _container(documents)["livenessProbe"]["httpGet"]["path"] = "/healthz"


def _misspelt_probe(documents: list[Any]) -> None:
    container = _container(documents)
    container["readinesProbe"] = container.pop("readinessProbe")


def _missing_secret_key(documents: list[Any]) -> None:
    for variable in _container(documents)["env"]:
        if variable["name"] == "HIVE_TICKETS_MONGO_URI":
            variable["valueFrom"]["secretKeyRef"]["key"] = "mongo-uri"


def _no_limits(documents: list[Any]) -> None:
    del _container(documents)["resources"]["limits"]


def _writable_root(documents: list[Any]) -> None:
    _container(documents)["securityContext"]["readOnlyRootFilesystem"] = False


def _keeps_capabilities(documents: list[Any]) -> None:
    del _container(documents)["securityContext"]["capabilities"]


def _no_seccomp(documents: list[Any]) -> None:
    (deployment,) = [d for d in documents if d["kind"] == "Deployment"]
    del deployment["spec"]["template"]["spec"]["securityContext"]["seccompProfile"]


def _service_to_unknown_port(documents: list[Any]) -> None:
    (service,) = [d for d in documents if d["kind"] == "Service"]
    service["spec"]["ports"][0]["targetPort"] = "grcp"


def _selector_mismatch(documents: list[Any]) -> None:
    (deployment,) = [d for d in documents if d["kind"] == "Deployment"]
    deployment["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] = "tickets"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (_grpc_port_by_name, "readinessProbe.grpc.port: 'grpc' is not of type 'integer'"),
        (_http_readiness, "readinessProbe must be a gRPC health probe on the grpc port"),
        (_wrong_grpc_port, "readinessProbe gRPC port 50051 is not the grpc port 50052"),
        (_liveness_elsewhere, "livenessProbe must GET /health on port 8000"),
        (_misspelt_probe, "'readinesProbe' was unexpected"),
        (_missing_secret_key, "Secret 'hive-secrets' has no key 'mongo-uri'"),
        (_no_limits, "resources.limits lacks cpu, memory"),
        (_writable_root, "readOnlyRootFilesystem is not true"),
        (_keeps_capabilities, "capabilities.drop does not contain ALL"),
        (_no_seccomp, "seccompProfile is not RuntimeDefault or Localhost"),
        (_service_to_unknown_port, "targetPort 'grcp' is no container port"),
        (_selector_mismatch, "does not match the pod labels"),
    ],
    ids=lambda value: getattr(value, "__name__", "").lstrip("_") or None,
)
def test_a_broken_manifest_fails(
    copy: Path, change: Callable[[list[Any]], None], expected: str
) -> None:
    _edit_yaml(copy / TICKETS_K8S, change)
    problems = _problems(copy, only="k8s")
    assert any(expected in problem for problem in problems), problems


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("ENTRYPOINT [", "ENTRYPIONT [", "Unknown instruction: ENTRYPIONT"),
        ("HEALTHCHECK --interval=10s", "HEALTHCHECK --interval=10", "missing unit in duration"),
        ("USER 10001:10001", "USER root", "the final stage must switch to a non-root USER"),
        ("COPY --from=builder", "COPY --from=build", "COPY --from=build: no earlier stage"),
        ("EXPOSE 50052 8000 9090", "EXPOSE 50052 8000 90900", "EXPOSE 90900: not a port"),
        ("HEALTHCHECK --interval", "HEALTHCHECK NONE\n# --interval", "has no HEALTHCHECK"),
        ("python:3.11-slim-bookworm", "python", "needs an explicit tag"),
        ("--no-editable --no-cache --package", "--no-editable --package", "needs --no-cache"),
        ("COPY libs/common/src libs", "COPY libs/commons/src libs", "not in the build context"),
        ("COPY pyproject.toml uv.lock ./", "COPY pyproject.toml uv.lock .ci ./", "excluded by"),
    ],
)
def test_a_broken_dockerfile_fails(copy: Path, old: str, new: str, expected: str) -> None:
    _edit_text(copy / TICKETS_DOCKERFILE, old, new)
    problems = _problems(copy, only="docker")
    assert any(expected in problem for problem in problems), problems


def test_an_http_only_service_must_have_a_ready_readiness_probe(copy: Path) -> None:
    """Without a gRPC port, readiness is GET /ready (what the orchestrator would use without
    its gRPC twin); GET /health is liveness, not readiness."""

    def http_only(documents: list[Any]) -> None:
        container = _container(documents)
        container["ports"] = [p for p in container["ports"] if p["name"] != "grpc"]
        container["readinessProbe"] = {"httpGet": {"path": "/health", "port": 8000}}
        (service,) = [d for d in documents if d["kind"] == "Service"]
        service["spec"]["ports"] = [p for p in service["spec"]["ports"] if p["name"] != "grpc"]

    _edit_yaml(copy / TICKETS_K8S, http_only)
    problems = _problems(copy, only="k8s")
    assert any("or httpGet /ready without gRPC" in problem for problem in problems), problems

    def ready(documents: list[Any]) -> None:
        _container(documents)["readinessProbe"]["httpGet"]["path"] = "/ready"

    _edit_yaml(copy / TICKETS_K8S, ready)
    assert _problems(copy, only="k8s") == []
