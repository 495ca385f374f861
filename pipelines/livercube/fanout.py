"""Spread a list of independent, picklable jobs over this process or a Dask cluster.

Planning reads tens of thousands of DICOM headers; on one client that caps how much faster a
cluster can make a conversion (the volume tasks wait for the plan).  A planner therefore takes
a :data:`Mapper` — ``mapper(fn, items)`` returns ``[fn(item) for item in items]`` in order —
and never knows where ``fn`` ran: :func:`local_map` runs it here, :func:`dask_map` on the
workers of a Dask client.  An item whose job could not be run (it raised after its retries,
its workers kept dying) comes back as the exception instead of a result, so the caller can
name every input it lost instead of failing the whole plan.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")

#: ``mapper(fn, items)`` → one result (or the exception that stopped it) per item, in order.
Mapper = Callable[[Callable[[Any], Any], Sequence[Any]], list[Any]]


def chunks(items: Sequence[T], size: int) -> list[list[T]]:
    """``items`` cut into consecutive lists of at most ``size`` (order kept)."""
    if size < 1:
        raise ValueError(f"chunk size must be at least 1, not {size}")
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def local_map(fn: Callable[[T], R], items: Sequence[T]) -> list[R | BaseException]:
    """Run every job in this process, one after the other (jobs may use threads inside).

    Exceptions propagate: locally there is no retry that could make a second attempt succeed,
    and a bug must not pass for a damaged input.
    """
    return [fn(item) for item in items]


def dask_map(client: Any, *, name: str, retries: int, progress: bool = False) -> Mapper:
    """A :data:`Mapper` running each job as one task on ``client``'s cluster.

    Results are collected as tasks finish and released at once, so the scheduler never holds
    more than the jobs still running; ``retries`` absorbs lost workers and transient errors.
    """

    def run(fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        from distributed import as_completed
        from tqdm import tqdm

        if not items:
            return []
        token = uuid.uuid4().hex[:8]
        futures = client.map(
            fn,
            list(items),
            key=[f"livercube-{name}-{token}-{i}" for i in range(len(items))],
            retries=retries,
            pure=False,
        )
        index = {f.key: i for i, f in enumerate(futures)}
        out: list[Any] = [None] * len(futures)
        bar = tqdm(total=len(futures), desc=name, unit="task", disable=not progress)
        for fut in as_completed(futures):
            i = index[fut.key]
            out[i] = fut.result() if fut.status == "finished" else fut.exception()
            fut.release()
            bar.update(1)
        bar.close()
        return out

    return run
