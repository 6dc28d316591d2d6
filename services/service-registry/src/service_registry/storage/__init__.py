"""PostgreSQL persistence of the registry; psycopg errors never leave this package."""

from service_registry.storage.repository import SweepResult, WorkerRepository

__all__ = ["SweepResult", "WorkerRepository"]
