"""PostgreSQL persistence of plans and plan ownership; psycopg errors never leave it."""

from pathlib import Path

from hive_common.postgres import open_pool
from orchestrator_dynamic.storage.plans import PlanRepository, Pool

MIGRATIONS_DIRECTORY = Path(__file__).parent / "migrations"

__all__ = ["MIGRATIONS_DIRECTORY", "PlanRepository", "Pool", "open_pool"]
