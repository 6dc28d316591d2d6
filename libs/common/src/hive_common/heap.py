"""Process-wide memory settings for long-running service processes."""

from __future__ import annotations

import gc


def freeze_heap() -> None:
    """Exclude every object alive now from the garbage collector's full collections.

    Call once in a service's (or worker's) entry point after it is built: the modules,
    descriptors, pools and servers made at start-up live as long as the process, yet
    every full collection scanned them; on the ticket service that was ~110,000 objects
    and pauses of up to ~90 ms in the middle of requests (about 25 ms once frozen; see
    ``bench.experiments.gc_pauses``). See ``gc.freeze``. Not for processes that build and
    drop many services, such as test runs: frozen garbage is never collected.
    """
    gc.collect()
    gc.freeze()


__all__ = ["freeze_heap"]
