"""Dask worker plugins the converter registers on the clusters it uses."""

from __future__ import annotations

from typing import Any

from distributed import WorkerPlugin


class EncodeThreads(WorkerPlugin):
    """zarr's codec pool sized to the worker's own thread count.

    ``N`` workers × ``T`` threads then encode with at most ``N × T`` CPU threads instead of
    ``N × (cores + 4)`` (see :func:`~livercube.store.writer.limit_encode_threads`).  Workers
    that join or restart later get it too: the scheduler keeps registered plugins.
    """

    name = "livercube-encode-threads"

    def setup(self, worker: Any) -> None:
        from livercube.store.writer import limit_encode_threads

        limit_encode_threads(worker.state.nthreads)


class ReuseFreedMemory(WorkerPlugin):
    """glibc's malloc thresholds put back on the worker, which Dask's nanny had pinned low:
    volume tasks then recycle their freed buffers instead of page-faulting every one of
    them in afresh (~45 % more CPU per task otherwise; see :mod:`livercube.worker_memory`).

    On a cluster shared with other work, the thresholds apply to every task the worker runs
    from then on, until the worker process restarts (unregistering the plugin does not undo
    them); they are glibc's usual behaviour, not a livercube-specific one.
    """

    name = "livercube-reuse-freed-memory"

    def setup(self, worker: Any) -> None:
        from livercube.worker_memory import reuse_freed_memory

        reuse_freed_memory()
