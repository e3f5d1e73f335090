"""The project's one process pool: a map over tasks with a progress bar.

Scoring, SynthStreets generation and ``dance check-data`` all fan per-image work out to worker
processes through ``parallel_map``. It is built on ``concurrent.futures.ProcessPoolExecutor``
rather than ``multiprocessing.Pool``: when a worker dies (the OOM killer, a segfault in a decoder)
the executor raises ``BrokenProcessPool``, where a ``Pool`` waits forever for its results; here
that becomes a one-line DanceError. Workers ignore SIGINT: on Ctrl-C only this process raises
KeyboardInterrupt (not one traceback per worker), and it stops the workers before it unwinds.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from tqdm import tqdm

from dance.errors import DanceError


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


def _exit_on_terminate(signum, frame) -> None:
    """Exit now, as a worker exits normally: multiprocessing's exit hook runs this process's
    finalizers (its semaphores unregistered, its queues flushed), then the process ends. Not
    SystemExit: the executor would catch it as a task's failure and wait for the next task."""
    try:
        from multiprocessing import util
        util._exit_function()
    finally:
        os._exit(128 + signum)


def _worker_start(initializer: Callable | None, initargs: tuple) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    # stopped by the parent: unwind (temp files removed, locks and semaphores released)
    signal.signal(signal.SIGTERM, _exit_on_terminate)
    if initializer is not None:
        initializer(*initargs)


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Terminate the pool's processes now (running tasks included): what Ctrl-C or a failed task
    asks for. ``terminate_workers`` from Python 3.14; before, the executor's process table."""
    terminate = getattr(pool, "terminate_workers", None)
    if terminate is not None:
        terminate()
        return
    processes = list((getattr(pool, "_processes", None) or {}).values())
    for proc in processes:
        with contextlib.suppress(Exception):
            proc.terminate()
    # wait until they are gone: a worker still alive when the pool closes its queues reads
    # their end and prints a traceback
    for proc in processes:
        with contextlib.suppress(Exception):
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()


@contextlib.contextmanager
def process_pool(workers: int, what: str, initializer: Callable | None = None,
                 initargs: tuple = (), mp_context=None) -> Iterator[ProcessPoolExecutor]:
    """A ``ProcessPoolExecutor`` whose workers ignore SIGINT. When the block raises (Ctrl-C, a
    task's error) the workers are terminated before the exception goes on; a worker that died
    (OOM killer, segfault) is a one-line DanceError naming ``what`` it was doing."""
    pool = ProcessPoolExecutor(workers, mp_context=mp_context, initializer=_worker_start,
                               initargs=(initializer, initargs))
    try:
        yield pool
    except BrokenProcessPool:
        _stop_workers(pool)
        raise DanceError(f"a worker process died while {what} (killed by the system, perhaps "
                         "out of memory); rerun with fewer workers") from None
    except BaseException:
        _stop_workers(pool)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def parallel_map(func: Callable, tasks: Iterable, workers: int | None,
                 initializer: Callable | None = None, initargs: tuple = (),
                 progress: bool = True, desc: str = "", *, ordered: bool = False,
                 unit: str = "img", chunksize: int | None = None,
                 what: str | None = None) -> Iterator[Any]:
    """Yield ``func(task)`` for every task, computed by ``worker_count(workers, len(tasks))``
    processes (in this process when that is 1), with a tqdm bar on stderr unless ``progress`` is
    off.

    Results come in completion order, or in task order with ``ordered``. ``initializer(*initargs)``
    runs once in each worker (or once here, in-process) before its first task; ``func``, the tasks
    and the initializer's arguments must pickle. Tasks travel in chunks of ``chunksize`` (default:
    about eight chunks per worker, at most 32 tasks each). A task's exception is raised here; when
    the consumer stops early (an exception, ``close()``, Ctrl-C), the workers are stopped. A
    worker that dies is a DanceError saying it died while doing ``what`` (default: ``desc``).
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
        with process_pool(n_workers, what or desc or "working", initializer, initargs) as pool:
            futures = [pool.submit(_run_chunk, func, tasks[i:i + chunksize])
                       for i in range(0, len(tasks), chunksize)]
            for future in (futures if ordered else as_completed(futures)):
                for result in future.result():
                    yield result
                    bar.update()
    finally:
        bar.close()
