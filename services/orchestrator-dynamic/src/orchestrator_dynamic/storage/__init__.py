"""PostgreSQL persistence of plans and plan ownership; psycopg errors never leave it."""

from pathlib import Path

from orchestrator_dynamic.storage.plans import PlanRepository, Pool, open_pool

MIGRATIONS_DIRECTORY = Path(__file__).parent / "migrations"

__all__ = ["MIGRATIONS_DIRECTORY", "PlanRepository", "Pool", "open_pool"]
