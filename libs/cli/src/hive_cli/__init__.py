"""``hive``: the Hive Flow C operator command line (plans, tickets, workers over HTTP)."""

from hive_cli.cli import main
from hive_cli.exit_codes import ExitCode

__all__ = ["ExitCode", "main"]
