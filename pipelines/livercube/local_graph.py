"""Independent tasks as a Dask graph on this process's threads, results as each one ends.

``convert --scheduler threads`` (the default, and what a laptop run uses) needs no cluster:
no scheduler, no worker, no comms, no dashboard.  Starting ``distributed``'s in-process
cluster for it cost ~0.3 CPU s of imports and start-up per run, a sixth of converting one
100-slice series, for a pool of threads.  Dask's own threaded scheduler runs the same graph
(one key per volume) with none of that.

What the distributed path gives a task is kept: a task that raises is retried, and one that
still raises comes back as its exception (with its traceback) instead of stopping the run,
so one bad input never costs the others.
"""

from __future__ import annotations

import functools
import queue
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TaskFailure:
    """A task that raised on every attempt: its last error and that error's traceback."""

    error: Exception
    traceback: str


#: What a task the caller no longer waits for returns without running.
_CANCELLED = object()


def _attempts(
    fn: Callable[..., Any], item: Any, args: tuple, retries: int, stop: threading.Event
) -> Any:
    """``fn(item, *args)``, tried ``1 + retries`` times; the last error as a TaskFailure."""
    for attempt in range(retries + 1):
        if stop.is_set():
            return _CANCELLED
        try:
            return fn(item, *args)
        except Exception as exc:  # handed back to the caller, never lost
            if attempt == retries:
                return TaskFailure(exc, "".join(traceback.format_tb(exc.__traceback__)))
    raise AssertionError("unreachable")  # pragma: no cover


_DONE = object()


def run_threaded(
    fn: Callable[..., Any],
    items: Sequence[Any],
    args: tuple = (),
    *,
    threads: int,
    retries: int,
    name: str = "task",
) -> Iterator[tuple[int, Any]]:
    """``(index, fn(items[index], *args))`` for every item, in the order the tasks end.

    A result is a :class:`TaskFailure` when the task raised on every one of its
    ``1 + retries`` attempts.  The graph runs in a background thread so results reach the
    caller while later tasks still run; an error of the scheduler itself (never of a task)
    is raised here after the tasks running at that moment have ended.

    A caller that stops early (an error of its own, ``close()``) gets control back only once
    the tasks running at that moment have ended, and no task starts after that: nothing
    keeps writing behind the back of a caller that has moved on (or given up its lease).
    """
    from dask.threaded import get

    if not items:
        return
    keys = [f"{name}-{i}" for i in range(len(items))]
    index = {k: i for i, k in enumerate(keys)}
    # each task is a bare callable: dask never looks inside the item or the arguments
    stop = threading.Event()
    graph = {
        k: (functools.partial(_attempts, fn, item, args, retries, stop),)
        for k, item in zip(keys, items, strict=True)
    }
    ended: queue.SimpleQueue = queue.SimpleQueue()

    def posttask(key: Any, result: Any, _dsk: Any, _state: Any, _worker: Any) -> None:
        ended.put((index[key], result))

    def schedule() -> None:
        try:
            with ThreadPoolExecutor(max(1, threads), thread_name_prefix=name) as pool:
                get(graph, keys, pool=pool, callbacks=[(None, None, None, posttask, None)])
        except BaseException as exc:  # re-raised in the caller's thread
            ended.put((_DONE, exc))
        else:
            ended.put((_DONE, None))

    runner = threading.Thread(target=schedule, name=f"{name}-scheduler", daemon=True)
    runner.start()
    try:
        while True:
            i, result = ended.get()
            if i is _DONE:
                runner.join()
                if result is not None:
                    raise result
                return
            yield i, result
    finally:
        stop.set()  # the caller stopped early: start nothing more, wait for what runs
        runner.join()
