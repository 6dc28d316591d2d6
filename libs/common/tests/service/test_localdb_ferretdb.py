"""LocalMongo's FerretDB process settings, checked on a real FerretDB process."""

from __future__ import annotations

from pathlib import Path

import pytest

from hive_common import localdb

pytestmark = pytest.mark.service


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (item.decode().partition("=") for item in raw.split(b"\0") if item)
    return {key: value for key, _, value in pairs}


def _ferretdb() -> Path:
    binary = localdb.find_ferretdb()
    if binary is None:
        pytest.skip("no FerretDB binary on this machine (scripts/install-tools.sh builds it)")
    return binary


@pytest.mark.parametrize(
    ("ours", "expected"), [(None, localdb.FERRETDB_GOGC), ("150", "150")], ids=["default", "ours"]
)
def test_ferretdb_runs_with_a_relaxed_go_collector_unless_told_otherwise(
    monkeypatch: pytest.MonkeyPatch, ours: str | None, expected: str
) -> None:
    if ours is None:
        monkeypatch.delenv("GOGC", raising=False)
    else:
        monkeypatch.setenv("GOGC", ours)
    with localdb.LocalMongo(server=("ferretdb", _ferretdb())) as server:
        assert server._process is not None
        assert _environ(server._process.pid)["GOGC"] == expected
