"""Independent jobs spread over spawned processes, their results in order (standard library only).

Spawned, not forked: a worker starts clean (no copied torch threads or open files), so a script that calls
this with more than one worker must do so under ``if __name__ == "__main__":``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any


def map_in_processes(fn: Callable[[Any], Any], jobs: Sequence[Any], workers: int) -> Iterator[Any]:
    """``fn(job)`` for each of ``jobs``, yielded in order: here, or over ``workers`` spawned processes
    (``fn`` and the jobs must pickle; the results are the same either way when each job depends on itself
    only)."""
    workers = min(int(workers), len(jobs))
    if workers <= 1:
        yield from map(fn, jobs)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield from pool.map(fn, jobs)
