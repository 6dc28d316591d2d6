"""Offline static checks of the deployment files: compose, Kubernetes manifests, Dockerfiles.

No Docker engine or cluster is needed, and nothing is fetched:

* ``docker-compose.yml`` against the Compose Specification JSON schema (the copy bundled in
  ``check-jsonschema``), then cross-references: ``depends_on`` targets exist,
  ``service_healthy`` targets have a healthcheck, build files and bind-mount sources exist,
  every ``${VAR}`` has a default so ``docker compose up`` works with an empty environment.
* ``deploy/k8s/*.yaml`` against the Kubernetes OpenAPI schemas in strict mode (unknown fields
  are errors; the schemas ship inside ``kubernetes-validate``), then the project's rules:
  the probes of the design (startup and liveness ``GET /health`` on the ``http`` port,
  readiness gRPC health on the ``grpc`` port), resources, non-root read-only containers that
  Pod Security "restricted" admits, ConfigMap/Secret references that resolve, Services that
  select a Deployment's ports.
* Dockerfiles with ``dockerfile-utils`` (npm; the linter of the VS Code Docker extension),
  any diagnostic failing, then the project's rules: a non-root ``USER`` in the final stage,
  ``COPY --from`` naming an earlier stage, valid ``EXPOSE`` ports, a ``HEALTHCHECK`` in every
  image that exposes an HTTP port, tagged base images, and no ``uv sync`` that could install
  our packages from a stale cached wheel.

Usage: ``python scripts/lint_deploy.py`` checks the repository's files; ``--compose``,
``--k8s`` and ``--dockerfile`` check other files (only those given). Exit status 1 when
anything is wrong, 2 when a tool is missing.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
KUBERNETES_VERSION = "1.30"
"""Oldest Kubernetes the manifests must work on (gRPC probes are GA since 1.27)."""

HEALTH_PATH = "/health"


class ToolMissingError(Exception):
    """A checker program is not installed."""


@dataclass
class Report:
    """Problems found, as ``location: message`` lines."""

    problems: list[str] = field(default_factory=list)

    def add(self, location: object, message: str) -> None:
        self.problems.append(f"{location}: {message}")


# --- docker-compose.yml -----------------------------------------------------------------------

_INTERPOLATION = re.compile(r"\$(\$|\{([^}]*)\})")
_VARIABLE_WITH_MODIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(:?[-?+].*)?$", re.DOTALL)


def check_compose(path: Path, report: Report) -> None:
    """Schema, then cross-references that the schema cannot express."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.compose-spec",
            str(path),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip()
        if "No module named check_jsonschema" in output:
            raise ToolMissingError("check-jsonschema (uv sync --all-packages)")
        report.add(path, f"does not match the Compose Specification schema:\n{output}")
        return

    text = path.read_text()
    for match in _INTERPOLATION.finditer(text):
        if match.group(1) == "$":
            continue  # "$$" is a literal dollar
        expression = match.group(2)
        where = f"{path}:{text.count(chr(10), 0, match.start()) + 1}"
        parsed = _VARIABLE_WITH_MODIFIER.match(expression)
        if parsed is None:
            report.add(where, f"malformed interpolation ${{{expression}}}")
        elif not (parsed.group(1) or "").lstrip(":").startswith(("-", "+")):
            report.add(
                where,
                f"${{{expression}}} has no default: use ${{VAR:-default}} so that "
                "`docker compose up` works with an empty environment",
            )

    document = yaml.safe_load(text)
    services: dict[str, Any] = document.get("services") or {}
    base = path.parent
    for name, service in services.items():
        where = f"{path}: services.{name}"
        for target, condition in _depends_on(service.get("depends_on")):
            if target not in services:
                report.add(where, f"depends_on names an undefined service {target!r}")
            elif condition == "service_healthy" and not _has_healthcheck(services[target]):
                report.add(
                    where,
                    f"depends_on {target!r} with condition service_healthy, but {target!r} "
                    "has no healthcheck",
                )
        build = service.get("build")
        if build is not None:
            context = base / (build if isinstance(build, str) else build.get("context", "."))
            dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile")
            if not context.is_dir():
                report.add(where, f"build context {context} does not exist")
            elif dockerfile and not (context / dockerfile).is_file():
                report.add(where, f"build dockerfile {context / dockerfile} does not exist")
        for volume in service.get("volumes") or []:
            if isinstance(volume, str):
                # "SOURCE:TARGET[:MODE]"; a lone path is an anonymous volume.
                source = volume.split(":", 1)[0] if ":" in volume else None
            else:
                source = volume.get("source")
            if isinstance(source, str) and source.startswith((".", "/")):
                if not (base / source).exists():
                    report.add(where, f"bind-mount source {source} does not exist")
            elif isinstance(source, str) and source not in (document.get("volumes") or {}):
                report.add(where, f"volume {source!r} is not declared under top-level volumes")


def _depends_on(value: Any) -> Iterator[tuple[str, str]]:
    if isinstance(value, list):
        for target in value:
            yield target, "service_started"
    elif isinstance(value, dict):
        for target, options in value.items():
            yield target, (options or {}).get("condition", "service_started")


def _has_healthcheck(service: dict[str, Any]) -> bool:
    healthcheck = service.get("healthcheck")
    if not healthcheck or healthcheck.get("disable"):
        return False
    test = healthcheck.get("test")
    return bool(test) and test != ["NONE"]


# --- Kubernetes manifests ---------------------------------------------------------------------


@dataclass
class _Resource:
    path: Path
    body: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.body.get("kind"))

    @property
    def name(self) -> str:
        return str((self.body.get("metadata") or {}).get("name"))

    def __str__(self) -> str:
        return f"{self.path}: {self.kind}/{self.name}"


def load_manifests(paths: Iterable[Path], report: Report) -> list[_Resource]:
    resources: list[_Resource] = []
    for path in paths:
        try:
            documents = list(yaml.safe_load_all(path.read_text()))
        except yaml.YAMLError as exc:
            report.add(path, f"not valid YAML: {exc}")
            continue
        for document in documents:
            if document is None:
                continue
            if not isinstance(document, dict):
                report.add(path, "a YAML document that is not a mapping")
                continue
            resources.append(_Resource(path, document))
    return resources


def check_kubernetes(paths: list[Path], report: Report, *, version: str) -> None:
    """Strict schema validation of every object, then the project's rules."""
    if not paths:
        report.add("deploy/k8s", "no manifests found")
        return
    resources = load_manifests(paths, report)
    valid: list[_Resource] = []
    for resource in resources:
        try:
            kubernetes_validate.validate(resource.body, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            location = ".".join(str(item) for item in exc.path) or "(root)"
            report.add(
                resource, f"schema (Kubernetes {version}, strict): {location}: {exc.message}"
            )
            continue
        except kubernetes_validate.SchemaNotFoundError:
            report.add(resource, f"no Kubernetes {version} schema for this apiVersion/kind")
            continue
        except (KeyError, TypeError) as exc:
            report.add(resource, f"not a Kubernetes object (missing {exc})")
            continue
        valid.append(resource)

    namespaces = {r.name for r in valid if r.kind == "Namespace"}
    data_keys: dict[tuple[str, str], set[str]] = {}
    for r in valid:
        if r.kind in ("ConfigMap", "Secret"):
            keys = set(r.body.get("data") or {}) | set(r.body.get("stringData") or {})
            data_keys[(r.kind, r.name)] = keys
    # Services are matched against every Deployment, valid or not, so that one schema error
    # is not reported again as "selects nothing".
    deployments = [r for r in resources if r.kind == "Deployment"]

    for r in valid:
        namespace = (r.body.get("metadata") or {}).get("namespace")
        if r.kind != "Namespace" and namespaces and namespace not in namespaces:
            report.add(r, f"namespace {namespace!r} is not among {sorted(namespaces)}")
        if r.kind == "Deployment":
            _check_deployment(r, data_keys, report)
        elif r.kind == "Service":
            _check_service(r, deployments, report)


def _check_deployment(
    r: _Resource, data_keys: dict[tuple[str, str], set[str]], report: Report
) -> None:
    spec = r.body["spec"]
    template = spec["template"]
    labels = (template.get("metadata") or {}).get("labels") or {}
    selector = (spec.get("selector") or {}).get("matchLabels") or {}
    if not selector or any(labels.get(k) != v for k, v in selector.items()):
        report.add(r, f"selector {selector} does not match the pod labels {labels}")
    pod = template["spec"]
    pod_security = pod.get("securityContext") or {}
    for container in pod.get("containers", []):
        where = f"{r}: container {container.get('name')}"
        security = container.get("securityContext") or {}
        if not (security.get("runAsNonRoot", pod_security.get("runAsNonRoot"))):
            report.add(where, "runAsNonRoot is not true")
        if not security.get("readOnlyRootFilesystem"):
            report.add(where, "readOnlyRootFilesystem is not true")
        if security.get("allowPrivilegeEscalation", True):
            report.add(where, "allowPrivilegeEscalation is not false")
        # What the namespace's Pod Security level "restricted" admits, checked here.
        if "ALL" not in ((security.get("capabilities") or {}).get("drop") or []):
            report.add(where, "capabilities.drop does not contain ALL")
        seccomp = security.get("seccompProfile") or pod_security.get("seccompProfile") or {}
        if seccomp.get("type") not in ("RuntimeDefault", "Localhost"):
            report.add(where, "seccompProfile is not RuntimeDefault or Localhost")
        resources = container.get("resources") or {}
        for part in ("requests", "limits"):
            missing = {"cpu", "memory"} - set(resources.get(part) or {})
            if missing:
                report.add(where, f"resources.{part} lacks {', '.join(sorted(missing))}")
        _check_probes(where, container, report)
        _check_references(where, container, data_keys, report)


def _check_probes(where: str, container: dict[str, Any], report: Report) -> None:
    ports = {p.get("name"): p["containerPort"] for p in container.get("ports") or []}
    if "http" in ports:
        for probe_name in ("startupProbe", "livenessProbe"):
            probe = container.get(probe_name)
            http_get = (probe or {}).get("httpGet")
            if http_get is None:
                report.add(where, f"{probe_name} must be httpGet {HEALTH_PATH} on the http port")
            elif http_get.get("path") != HEALTH_PATH or http_get.get("port") not in (
                "http",
                ports["http"],
            ):
                report.add(
                    where,
                    f"{probe_name} must GET {HEALTH_PATH} on port {ports['http']}, not "
                    f"{http_get.get('path')} on {http_get.get('port')}",
                )
    if "grpc" in ports:
        grpc = (container.get("readinessProbe") or {}).get("grpc")
        if grpc is None:
            report.add(where, "readinessProbe must be a gRPC health probe on the grpc port")
        elif grpc.get("port") != ports["grpc"]:
            report.add(
                where,
                f"readinessProbe gRPC port {grpc.get('port')} is not the grpc port {ports['grpc']}",
            )
    elif "http" in ports:
        http_get = (container.get("readinessProbe") or {}).get("httpGet")
        if http_get is None or http_get.get("path") != "/ready":
            report.add(where, "readinessProbe must be a gRPC probe, or httpGet /ready without gRPC")


def _check_references(
    where: str,
    container: dict[str, Any],
    data_keys: dict[tuple[str, str], set[str]],
    report: Report,
) -> None:
    for source in container.get("envFrom") or []:
        for field_name, kind in (("configMapRef", "ConfigMap"), ("secretRef", "Secret")):
            ref = source.get(field_name)
            if ref and not ref.get("optional") and (kind, ref.get("name")) not in data_keys:
                report.add(where, f"envFrom {kind} {ref.get('name')!r} is not in the manifests")
    for variable in container.get("env") or []:
        value_from = variable.get("valueFrom") or {}
        for field_name, kind in (("configMapKeyRef", "ConfigMap"), ("secretKeyRef", "Secret")):
            ref = value_from.get(field_name)
            if not ref or ref.get("optional"):
                continue
            keys = data_keys.get((kind, ref.get("name")))
            if keys is None:
                report.add(where, f"env {variable['name']}: {kind} {ref.get('name')!r} is missing")
            elif ref.get("key") not in keys:
                report.add(
                    where,
                    f"env {variable['name']}: {kind} {ref.get('name')!r} has no key "
                    f"{ref.get('key')!r}",
                )


def _check_service(r: _Resource, deployments: list[_Resource], report: Report) -> None:
    selector = r.body["spec"].get("selector") or {}
    matching = [
        template
        for template in (_pod_template(d) for d in deployments)
        if selector
        and all(
            ((template.get("metadata") or {}).get("labels") or {}).get(k) == v
            for k, v in selector.items()
        )
    ]
    if not matching:
        report.add(r, f"selector {selector} matches no Deployment in the manifests")
        return
    ports: dict[object, object] = {}
    for template in matching:
        for container in (template.get("spec") or {}).get("containers") or []:
            for port in container.get("ports") or []:
                ports[port.get("containerPort")] = port.get("containerPort")
                if port.get("name"):
                    ports[port["name"]] = port.get("containerPort")
    for port in r.body["spec"].get("ports") or []:
        target = port.get("targetPort", port.get("port"))
        if target not in ports:
            report.add(r, f"port {port.get('name')!r}: targetPort {target!r} is no container port")


def _pod_template(deployment: _Resource) -> dict[str, Any]:
    template = (deployment.body.get("spec") or {}).get("template")
    return template if isinstance(template, dict) else {}


# --- Dockerfiles ------------------------------------------------------------------------------


@dataclass
class _Instruction:
    line: int
    keyword: str
    arguments: str


def parse_dockerfile(text: str) -> list[_Instruction]:
    """Instructions with continuation lines joined; comments and blank lines dropped."""
    instructions: list[_Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not pending:
            if not stripped or stripped.startswith("#"):
                continue
            start = number
        elif stripped.startswith("#"):
            continue  # comments inside a continued instruction are dropped by Docker too
        if stripped.endswith("\\"):
            pending.append(stripped[:-1])
            continue
        pending.append(stripped)
        keyword, _, arguments = " ".join(pending).partition(" ")
        instructions.append(_Instruction(start, keyword.upper(), arguments.strip()))
        pending = []
    return instructions


def _dockerignore_patterns(context: Path) -> list[re.Pattern[str]]:
    """``.dockerignore`` exclusions as regular expressions (``!`` exceptions are not used)."""
    ignore_file = context / ".dockerignore"
    if not ignore_file.is_file():
        return []
    patterns: list[re.Pattern[str]] = []
    for raw in ignore_file.read_text().splitlines():
        line = raw.strip().strip("/")
        if not line or line.startswith(("#", "!")):
            continue
        regex = ""
        index = 0
        while index < len(line):
            if line.startswith("**/", index):
                regex, index = regex + "(?:.*/)?", index + 3
            elif line.startswith("**", index):
                regex, index = regex + ".*", index + 2
            else:
                char = line[index]
                regex += {"*": "[^/]*", "?": "[^/]"}.get(char, re.escape(char))
                index += 1
        patterns.append(re.compile(regex))
    return patterns


def _ignored(source: str, patterns: list[re.Pattern[str]]) -> bool:
    """True if ``source`` or a directory above it is excluded from the build context."""
    parts = Path(source).parts
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    return any(pattern.fullmatch(prefix) for pattern in patterns for prefix in prefixes)


def check_dockerfile(
    path: Path, report: Report, *, dockerfile_utils: Path, context: Path = REPO_ROOT
) -> None:
    """dockerfile-utils diagnostics (any counts), then the project's rules.

    ``context`` is the build context (the repository root for all our images): every
    ``COPY`` source must exist there and not be excluded by its ``.dockerignore``.
    """
    ignored = _dockerignore_patterns(context)
    result = subprocess.run(
        [str(dockerfile_utils), "lint", "--json", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        diagnostics = json.loads(result.stdout)
    except json.JSONDecodeError:
        report.add(path, f"dockerfile-utils failed: {(result.stdout + result.stderr).strip()}")
        return
    for diagnostic in diagnostics:
        line = diagnostic["range"]["start"]["line"] + 1
        report.add(f"{path}:{line}", f"{diagnostic['severity']}: {diagnostic['message']}")

    instructions = parse_dockerfile(path.read_text())
    args = {
        name: default
        for i in instructions
        if i.keyword == "ARG"
        for name, _, default in [i.arguments.partition("=")]
    }
    stages: list[str] = []
    user: str | None = None
    exposes_http = False
    has_healthcheck = False
    for i in instructions:
        where = f"{path}:{i.line}"
        if i.keyword == "FROM":
            words = i.arguments.split()
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), ""), words[0])
            if (
                image != "scratch"
                and image not in stages
                and (":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest"))
            ):
                report.add(where, f"base image {image!r} needs an explicit tag other than latest")
            stages.append(words[2] if len(words) >= 3 and words[1].upper() == "AS" else "")
            user, exposes_http, has_healthcheck = None, False, False
        elif i.keyword == "USER":
            user = i.arguments.split(":", 1)[0]
        elif i.keyword == "EXPOSE":
            for spec in i.arguments.split():
                port = spec.split("/", 1)[0]
                if not port.isdigit() or not 1 <= int(port) <= 65535:
                    report.add(where, f"EXPOSE {spec}: not a port number")
                elif port == "8000":
                    exposes_http = True
        elif i.keyword == "RUN" and "uv sync" in i.arguments:
            words = i.arguments.split()
            # uv keys its cache of wheels built from local directories on pyproject.toml, so a
            # cached (e.g. cache-mounted) wheel of a workspace member can hide source changes.
            if "--no-install-workspace" not in words and not {"--no-cache", "--refresh"} & set(
                words
            ):
                report.add(
                    where,
                    "a uv sync that installs workspace members needs --no-cache (or --refresh): "
                    "uv may reuse a wheel built from older sources",
                )
        elif i.keyword == "HEALTHCHECK":
            has_healthcheck = not i.arguments.upper().startswith("NONE")
        elif i.keyword in ("COPY", "ADD"):
            words = shlex.split(i.arguments)
            flags = [w for w in words if w.startswith("--")]
            from_stage = next(
                (f.removeprefix("--from=") for f in flags if f.startswith("--from=")), None
            )
            if from_stage is not None:
                if from_stage not in stages[:-1] and not from_stage.isdigit():
                    report.add(where, f"COPY --from={from_stage}: no earlier stage of that name")
                continue
            for source in [w for w in words if not w.startswith("--")][:-1]:
                if any(char in source for char in "*?[$"):
                    continue  # globs and variables: left to the build
                if not (context / source).exists():
                    report.add(where, f"{i.keyword} {source}: not in the build context {context}")
                elif _ignored(source.strip("/"), ignored):
                    report.add(where, f"{i.keyword} {source}: excluded by .dockerignore")
    if not stages:
        report.add(path, "no FROM instruction")
        return
    if user is None or user in ("root", "0"):
        report.add(path, "the final stage must switch to a non-root USER")
    if exposes_http and not has_healthcheck:
        report.add(path, "the final stage exposes HTTP 8000 but has no HEALTHCHECK")


# --- command line -----------------------------------------------------------------------------


def default_dockerfiles(root: Path) -> list[Path]:
    return sorted(root.glob("services/*/Dockerfile")) + sorted(
        root.glob("deploy/docker/*.Dockerfile")
    )


def run(
    *,
    compose: Path | None,
    k8s: list[Path],
    dockerfiles: list[Path],
    kubernetes_version: str = KUBERNETES_VERSION,
    dockerfile_utils: Path | None = None,
) -> Report:
    """Check what is given; a missing tool raises :class:`ToolMissingError`."""
    report = Report()
    if compose is not None:
        check_compose(compose, report)
    if k8s:
        check_kubernetes(k8s, report, version=kubernetes_version)
    if dockerfiles:
        linter = dockerfile_utils or REPO_ROOT / "node_modules" / ".bin" / "dockerfile-utils"
        if not linter.exists():
            raise ToolMissingError(f"dockerfile-utils at {linter} (npm ci)")
        for dockerfile in dockerfiles:
            check_dockerfile(dockerfile, report, dockerfile_utils=linter)
    return report


def _manifest_paths(paths: list[Path]) -> list[Path]:
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(sorted(path.glob("*.yaml")) + sorted(path.glob("*.yml")))
        else:
            found.append(path)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compose", type=Path, help="a compose file to check")
    parser.add_argument(
        "--k8s", type=Path, action="append", default=[], help="a manifest or a directory of them"
    )
    parser.add_argument("--dockerfile", type=Path, action="append", default=[])
    parser.add_argument("--kubernetes-version", default=KUBERNETES_VERSION)
    options = parser.parse_args(argv)

    if options.compose is None and not options.k8s and not options.dockerfile:
        options.compose = REPO_ROOT / "docker-compose.yml"
        options.k8s = [REPO_ROOT / "deploy" / "k8s"]
        options.dockerfile = default_dockerfiles(REPO_ROOT)
    try:
        report = run(
            compose=options.compose,
            k8s=_manifest_paths(options.k8s),
            dockerfiles=options.dockerfile,
            kubernetes_version=options.kubernetes_version,
        )
    except ToolMissingError as exc:
        print(f"lint-deploy: missing tool: {exc}; run `make install`", file=sys.stderr)
        return 2
    for problem in report.problems:
        print(problem, file=sys.stderr)
    checked = ", ".join(
        part
        for part, present in (
            ("compose", options.compose is not None),
            (f"{len(_manifest_paths(options.k8s))} manifest file(s)", bool(options.k8s)),
            (f"{len(options.dockerfile)} Dockerfile(s)", bool(options.dockerfile)),
        )
        if present
    )
    if report.problems:
        print(f"lint-deploy: {len(report.problems)} problem(s) in {checked}", file=sys.stderr)
        return 1
    print(f"lint-deploy: ok ({checked})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
