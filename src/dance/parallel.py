"""The project's one process pool: a map over tasks with a progress bar.

Scoring, SynthStreets generation and ``dance check-data`` all fan per-image work out to worker
processes through ``parallel_map``. It is built on ``concurrent.futures.ProcessPoolExecutor``
rather than ``multiprocessing.Pool``: when a worker dies (the OOM killer, a segfault in a decoder)
the executor raises ``BrokenProcessPool``, where a ``Pool`` waits forever for its results.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

from tqdm import tqdm


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), else the machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def worker_count(requested: int | None, n_tasks: int) -> int:
    """Processes to use for ``n_tasks`` tasks: ``requested``, or with None every core this
    process may run on (its CPU affinity, else the machine's cores); never more than the tasks
    and at least 1. A result of 1 means: run in this process, without a pool."""
    if requested is None:
        n = usable_cores()
    else:
        n = requested
    return max(1, min(n, n_tasks))


def _run_chunk(func: Callable, chunk: Sequence) -> list:
    return [func(task) for task in chunk]


def parallel_map(func: Callable, tasks: Iterable, workers: int | None,
                 initializer: Callable | None = None, initargs: tuple = (),
                 progress: bool = True, desc: str = "", *, ordered: bool = False,
                 unit: str = "img", chunksize: int | None = None) -> Iterator[Any]:
    """Yield ``func(task)`` for every task, computed by ``worker_count(workers, len(tasks))``
    processes (in this process when that is 1), with a tqdm bar on stderr unless ``progress`` is
    off.

    Results come in completion order, or in task order with ``ordered``. ``initializer(*initargs)``
    runs once in each worker (or once here, in-process) before its first task; ``func``, the tasks
    and the initializer's arguments must pickle. Tasks travel in chunks of ``chunksize`` (default:
    about eight chunks per worker, at most 32 tasks each). A task's exception is raised here; when
    the consumer stops early (an exception, ``close()``), tasks not yet started are cancelled.
    """
    tasks = list(tasks)
    n_workers = worker_count(workers, len(tasks))
    bar = tqdm(total=len(tasks), desc=desc, unit=unit, disable=None if progress else True,
               file=sys.stderr)
    try:
        if n_workers <= 1:
            if initializer is not None:
                initializer(*initargs)
            for task in tasks:
                yield func(task)
                bar.update()
            return
        if chunksize is None:
            chunksize = max(1, min(32, len(tasks) // (n_workers * 8)))
        pool = ProcessPoolExecutor(n_workers, initializer=initializer, initargs=initargs)
        try:
            futures = [pool.submit(_run_chunk, func, tasks[i:i + chunksize])
                       for i in range(0, len(tasks), chunksize)]
            for future in (futures if ordered else as_completed(futures)):
                for result in future.result():
                    yield result
                    bar.update()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    finally:
        bar.close()
