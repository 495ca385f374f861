"""Workers recycle freed buffers: counted in page faults, on a real nanny-started worker."""

from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")


def buffer_churn_faults(rounds: int = 200, nbytes: int = 2**20) -> int:
    """Minor page faults of allocating, filling and freeing a 1 MiB buffer ``rounds`` times:
    what a volume task does with its chunk and slab buffers, reduced to its core."""
    import resource

    import numpy as np

    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(rounds):
        buf = np.empty(nbytes, np.uint8)
        buf.fill(1)
        del buf
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_a_process_with_the_nannys_trim_threshold_recycles_buffers_after_the_fix():
    """With ``MALLOC_TRIM_THRESHOLD_`` set, every 1 MiB buffer is a fresh mapping (256 faults
    each); after :func:`reuse_freed_memory` the same buffer is reused from the heap."""
    script = inspect.getsource(buffer_churn_faults) + textwrap.dedent(
        """
        from livercube.worker_memory import reuse_freed_memory
        pinned = buffer_churn_faults()
        ok = reuse_freed_memory()
        print(pinned, ok, buffer_churn_faults())
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        env={"MALLOC_TRIM_THRESHOLD_": "65536", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    pinned, ok, fixed = int(out[0]), out[1] == "True", int(out[2])
    assert ok
    assert pinned > 200 * 200  # ~256 faults per round: each buffer mapped and zero-filled
    assert fixed < pinned / 20


def test_the_converter_plugin_fixes_a_nanny_started_worker():
    from distributed import Client, LocalCluster

    from livercube.dask_plugins import ReuseFreedMemory

    with (
        LocalCluster(
            n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        env = client.run(lambda: __import__("os").environ.get("MALLOC_TRIM_THRESHOLD_"))
        assert set(env.values()) == {"65536"}  # the nanny's setting this fix is about
        (pinned,) = client.run(buffer_churn_faults).values()
        client.register_plugin(ReuseFreedMemory(), name=ReuseFreedMemory.name)
        (fixed,) = client.run(buffer_churn_faults).values()
    assert pinned > 200 * 200
    assert fixed < pinned / 20
