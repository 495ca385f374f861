"""Spread a list of independent, picklable jobs over this process or a Dask cluster.

Planning reads tens of thousands of DICOM headers; on one client that caps how much faster a
cluster can make a conversion (the volume tasks wait for the plan).  A planner therefore takes
a :data:`Mapper` — ``mapper(fn, items)`` returns ``[fn(item) for item in items]`` in order —
and never knows where ``fn`` ran: :func:`local_map` runs it here, :func:`dask_map` on the
workers of a Dask client.  An item whose job could not be run (it raised after its retries,
its workers kept dying) comes back as the exception instead of a result, so the caller can
name every input it lost instead of failing the whole plan.

A mapper that can also hand its results over one by one, in item order, as they come in
(:class:`StreamingMapper`, as :func:`dask_map`'s does) lets the caller fold each result in
while the workers are still busy with the next: :func:`results_in_order` uses that when it is
there, so what the client does per result overlaps the workers' work instead of following it.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol, TypeVar, runtime_checkable

T = TypeVar("T")
R = TypeVar("R")

#: ``mapper(fn, items)`` → one result (or the exception that stopped it) per item, in order.
Mapper = Callable[[Callable[[Any], Any], Sequence[Any]], list[Any]]


@runtime_checkable
class ParallelMapper(Protocol):
    """A :data:`Mapper` that can say how many jobs it runs at once (its cluster's threads)."""

    def __call__(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]: ...

    def slots(self) -> int: ...


@runtime_checkable
class StreamingMapper(Protocol):
    """A :data:`Mapper` that can also yield its results one by one, in item order."""

    def __call__(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]: ...

    def imap(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> Iterator[Any]: ...


def results_in_order(
    mapper: Mapper | None, fn: Callable[[Any], Any], items: Sequence[Any]
) -> Iterator[Any]:
    """``mapper(fn, items)`` one result at a time, in item order.

    A :class:`StreamingMapper` hands each result over as soon as it and every earlier one
    are in; any other mapper runs to the end first.  Without a mapper each job runs here when
    its result is asked for.
    """
    if mapper is None:
        return (fn(item) for item in items)
    if isinstance(mapper, StreamingMapper):
        return mapper.imap(fn, items)
    return iter(mapper(fn, items))


def mapper_slots(mapper: Mapper | None) -> int:
    """Jobs ``mapper`` runs at once: its own count if it knows one, else 1 (one after another)."""
    if isinstance(mapper, ParallelMapper):
        return max(1, int(mapper.slots()))
    return 1


def balanced_size(n_items: int, slots: int, *, per_slot: int, smallest: int, largest: int) -> int:
    """Items per job so that ``slots`` runners each get about ``per_slot`` jobs.

    Cutting a fixed number of items per job leaves workers idle when the items run out
    unevenly: 404 headers in jobs of 256 keep one of two workers busy for 256 and the other
    for 148.  Jobs stay between ``smallest`` (per-job overhead) and ``largest`` (result size,
    and a lost worker costs at most one job) items.
    """
    if n_items <= 0:
        return max(1, smallest)
    want = math.ceil(n_items / max(1, slots * per_slot))
    return max(1, min(largest, max(smallest, want)))


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


class DaskMapper:
    """A :data:`ParallelMapper` running each job as one task on ``client``'s cluster."""

    def __init__(self, client: Any, name: str, retries: int, progress: bool) -> None:
        self.client, self.name, self.retries, self.progress = client, name, retries, progress

    def slots(self) -> int:
        """Worker threads of the cluster now (workers may still be joining: at least 1)."""
        return max(1, sum(self.client.nthreads().values()))

    def __call__(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        """One task per item; results (or the exceptions that stopped them) in item order."""
        return list(self.imap(fn, items))

    def imap(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> Iterator[Any]:
        """One task per item; each result (or the exception that stopped it) is yielded, in
        item order, as soon as it and all before it have come back.

        Tasks are submitted in item order and mostly finish so; one that finishes early waits
        here (already fetched and released on the cluster) until its turn.
        """
        from distributed import as_completed
        from tqdm import tqdm

        if not items:
            return
        token = uuid.uuid4().hex[:8]
        futures = self.client.map(
            fn,
            list(items),
            key=[f"livercube-{self.name}-{token}-{i}" for i in range(len(items))],
            retries=self.retries,
            pure=False,
        )
        index = {f.key: i for i, f in enumerate(futures)}
        waiting: dict[int, Any] = {}
        following = 0
        bar = tqdm(total=len(futures), desc=self.name, unit="task", disable=not self.progress)
        try:
            for fut in as_completed(futures):
                waiting[index[fut.key]] = (
                    fut.result() if fut.status == "finished" else fut.exception()
                )
                fut.release()
                bar.update(1)
                while following in waiting:
                    yield waiting.pop(following)
                    following += 1
        finally:
            bar.close()
            for fut in futures[following:]:  # the caller stopped early: free the cluster
                fut.release()


def dask_map(client: Any, *, name: str, retries: int, progress: bool = False) -> DaskMapper:
    """A :data:`Mapper` running each job as one task on ``client``'s cluster.

    Results are collected as tasks finish and released at once, so the scheduler never holds
    more than the jobs still running; ``retries`` absorbs lost workers and transient errors.
    It knows its cluster's threads (:func:`mapper_slots`), so callers can cut work to fit, and
    it streams (:class:`StreamingMapper`), so they can fold results in as they arrive.
    """
    return DaskMapper(client, name, retries, progress)
