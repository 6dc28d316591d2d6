"""hive-worker: the Hive Flow C reference worker and its SDK.

::

    from hive_worker import TaskContext, Worker, WorkerSettings

    worker = Worker(settings=WorkerSettings(name="w1", capabilities=["python"]))

    @worker.task("resize")
    async def resize(params: dict, ctx: TaskContext) -> dict:
        return {"width": params["width"] / 2}

    asyncio.run(worker.run())
"""

from hive_worker.config import WorkerSettings
from hive_worker.handlers import (
    InvalidParameters,
    PermanentTaskError,
    TaskContext,
    TaskError,
    TaskHandler,
    TaskRegistry,
)
from hive_worker.sdk import Worker

__all__ = [
    "InvalidParameters",
    "PermanentTaskError",
    "TaskContext",
    "TaskError",
    "TaskHandler",
    "TaskRegistry",
    "Worker",
    "WorkerSettings",
]
