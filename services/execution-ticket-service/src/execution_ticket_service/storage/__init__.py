"""PostgreSQL and MongoDB adapters. Driver exceptions never leave this package."""

from pathlib import Path

# The schema's versioned migrations, applied at start-up (hive_common.migrations).
MIGRATIONS_DIRECTORY = Path(__file__).parent / "migrations"

__all__ = ["MIGRATIONS_DIRECTORY"]
