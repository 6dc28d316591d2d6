"""Each Dockerfile's builder stage, replayed without Docker, yields a working venv.

No Docker engine here, so the builder stage's own instructions run on the host: its ENV, its
COPY of repository paths into an empty context, its RUN commands (the ``uv sync`` lines; the
``pip install uv`` line is skipped, uv is already here). Then the context is deleted, as the
runtime stage only gets the venv, and the image's ENTRYPOINT must resolve to a console script
whose code imports, with every non-Python file of our packages (migrations) installed. This
catches a Dockerfile that forgets a workspace member or a package that drops its data files;
what it cannot show is anything about the base image itself.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hive_testsupport.scripts import load_script

REPO_ROOT = Path(__file__).resolve().parents[2]


lint_deploy = load_script("lint_deploy.py")

# Our import packages per workspace member, to compare their data files with the venv's.
PACKAGES = {
    "libs/contracts": "neuralhive",
    "libs/common": "hive_common",
    "libs/worker": "hive_worker",
    "services/execution-ticket-service": "execution_ticket_service",
    "services/service-registry": "service_registry",
    "services/orchestrator-dynamic": "orchestrator_dynamic",
}


def _replay_builder(dockerfile: Path, work: Path) -> tuple[Path, list[str], set[str]]:
    """Run the first stage into ``work``; return the venv, the ENTRYPOINT, copied members."""
    instructions = lint_deploy.parse_dockerfile(dockerfile.read_text())
    context = work / "context"
    context.mkdir()
    venv = work / "venv"
    python = os.path.realpath(sys.executable)
    env = dict(os.environ)
    env.pop("VIRTUAL_ENV", None)
    stage = -1
    entrypoint: list[str] = []
    members: set[str] = set()
    for instruction in instructions:
        if instruction.keyword == "FROM":
            stage += 1
        elif instruction.keyword == "ENTRYPOINT":
            entrypoint = json.loads(instruction.arguments)
        elif stage != 0:
            continue
        elif instruction.keyword == "ENV":
            for pair in shlex.split(instruction.arguments):
                name, _, value = pair.partition("=")
                env[name] = value
            # The image's /opt/venv and /usr/local/bin/python3 are this host's equivalents.
            env["UV_PROJECT_ENVIRONMENT"] = str(venv)
            env["UV_PYTHON"] = python
        elif instruction.keyword == "COPY":
            *sources, destination = shlex.split(instruction.arguments)
            for source in sources:
                origin = REPO_ROOT / source
                target = context / destination
                if destination.endswith("/"):
                    target = target / origin.name
                target.parent.mkdir(parents=True, exist_ok=True)
                if origin.is_dir():
                    shutil.copytree(origin, target, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy(origin, target)
                members.update(m for m in PACKAGES if source.startswith(m + "/"))
        elif instruction.keyword == "RUN":
            words = [w for w in shlex.split(instruction.arguments) if not w.startswith("--mount=")]
            if words[:2] == ["pip", "install"]:
                continue
            result = subprocess.run(
                words, cwd=context, env=env, capture_output=True, text=True, check=False
            )
            assert result.returncode == 0, f"RUN {shlex.join(words)}:\n{result.stderr}"
    shutil.rmtree(context)
    return venv, entrypoint, members


@pytest.mark.parametrize(
    "dockerfile",
    lint_deploy.default_dockerfiles(REPO_ROOT),
    ids=lambda path: str(path.relative_to(REPO_ROOT)),
)
def test_the_builder_stage_makes_a_venv_that_runs_the_entrypoint(
    dockerfile: Path, tmp_path: Path
) -> None:
    _check_image_venv(dockerfile, tmp_path)


def _check_image_venv(dockerfile: Path, tmp_path: Path) -> None:
    venv, entrypoint, members = _replay_builder(dockerfile, tmp_path)

    assert len(entrypoint) == 1
    assert (venv / "bin" / entrypoint[0]).is_file()
    # Load the console script's function: imports the service and everything it wires.
    load = (
        "import sys; from importlib.metadata import entry_points; "
        "(ep,) = entry_points(group='console_scripts', name=sys.argv[1]); "
        "print(callable(ep.load()))"
    )
    result = subprocess.run(
        [str(venv / "bin" / "python"), "-c", load, entrypoint[0]],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
        env={"PATH": f"{venv / 'bin'}:/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"

    (site_packages,) = (venv / "lib").glob("python3*/site-packages")
    for member in sorted(members):
        package = PACKAGES[member]
        source = REPO_ROOT / member / "src" / package
        data_files = [
            path.relative_to(source)
            for path in source.rglob("*")
            if path.is_file() and path.suffix not in (".py", ".pyc")
        ]
        missing = [f for f in data_files if not (site_packages / package / f).is_file()]
        assert not missing, f"{member}: not installed in the image venv: {missing}"
        # Installed as a wheel, not as a link back to the (deleted) source tree.
        assert (site_packages / package / "__init__.py").is_file()


def test_a_dockerfile_that_forgets_a_workspace_member_fails(tmp_path: Path) -> None:
    dockerfile = tmp_path / "worker.Dockerfile"
    original = (REPO_ROOT / "deploy" / "docker" / "worker.Dockerfile").read_text()
    assert "COPY libs/common/src libs/common/src\n" in original
    dockerfile.write_text(original.replace("COPY libs/common/src libs/common/src\n", ""))
    work = tmp_path / "work"
    work.mkdir()
    # uv builds hive-common from its pyproject alone (a wheel without code), so the build
    # passes, as `docker build` would; the entry point cannot import it.
    with pytest.raises(AssertionError, match="No module named 'hive_common'"):
        _check_image_venv(dockerfile, work)
