"""Convert a collection on a SLURM cluster: dask-jobqueue workers, livercube as the client.

Run it on a login node (or inside a small allocation) with the project installed plus
``dask-jobqueue``; the workers are SLURM jobs that start ``dask worker`` with the same Python
environment (shared filesystem), connect back to the scheduler this script starts, and are
cancelled when it exits::

    pip install -e . dask-jobqueue
    python deploy/slurm/convert_slurm.py /lustre/raw/Colorectal-Liver-Metastases \\
        /lustre/stores/livercube.zarr --collection crlm --jobs 16 --partition cpu --account proj

Each SLURM job holds ``--workers-per-job`` single-threaded workers (one volume at a time each:
peak memory ~0.2 GB + 2.6 × the largest volume's raw int16 size, see benchmarks/README.md
"Conversion": 1.0 GB for a 600-slice 512² series; the 2 GiB default keeps that under Dask's
80 % pause threshold up to ~1000 slices).  The report is
printed and written to ``DEST/livercube-report.json``; the exit status is the CLI's (0 all
converted, 3 some inputs skipped or failed, 2 usage error, 1 otherwise).

Object storage works too: pass ``s3://…`` URLs and ``--storage-option``/``--source-option``;
credentials come from the environment (``AWS_*``) that SLURM propagates to the worker jobs.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", help="collection root (path or fsspec URL)")
    p.add_argument("dest", help="store URL")
    p.add_argument("--collection", required=True, help="hcc-tace-seg, crlm or plc-cect")
    p.add_argument("--clinical")
    p.add_argument("--overrides")
    p.add_argument("--storage-option", action="append", metavar="KEY=VALUE")
    p.add_argument("--source-option", action="append", metavar="KEY=VALUE")
    p.add_argument("--jobs", type=int, default=8, help="SLURM jobs to submit")
    p.add_argument("--workers-per-job", type=int, default=4, help="dask workers per SLURM job")
    p.add_argument("--memory-per-worker", default="2GiB")
    p.add_argument("--walltime", default="04:00:00")
    p.add_argument("--partition", help="SLURM partition (queue)")
    p.add_argument("--account", help="SLURM account/project")
    p.add_argument(
        "--interface", help="network interface the workers reach the scheduler on, e.g. ib0"
    )
    p.add_argument("--local-directory", default="$TMPDIR", help="worker scratch (node-local disk)")
    p.add_argument(
        "--wait-workers",
        type=int,
        default=1,
        help="start converting once this many workers are up (the rest join as they start)",
    )
    return p.parse_args(argv)


def _memory_bytes(text: str) -> float:
    from dask.utils import parse_bytes

    return parse_bytes(text)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)

    from dask.utils import format_bytes
    from dask_jobqueue import SLURMCluster
    from distributed import Client

    from livercube.cli import _storage_options
    from livercube.convert import convert

    n = a.workers_per_job
    job_memory = format_bytes(_memory_bytes(a.memory_per_worker) * n)
    cluster = SLURMCluster(
        queue=a.partition,
        account=a.account,
        cores=n,  # one thread per worker: processes=n, cores=n
        processes=n,
        memory=job_memory,
        walltime=a.walltime,
        interface=a.interface,
        local_directory=a.local_directory,
        job_name="livercube-worker",
        log_directory="slurm-logs",
    )  # dask-jobqueue gives each worker memory/processes as its --memory-limit
    try:
        print(cluster.job_script(), file=sys.stderr)
        cluster.scale(jobs=a.jobs)
        with Client(cluster) as client:
            client.wait_for_workers(min(a.wait_workers, a.jobs * n), timeout="1h")
            print(f"dashboard: {client.dashboard_link}", file=sys.stderr)
            # convert() connects its own Client to the scheduler address (the tcp:// path
            # of `livercube convert --scheduler`), exactly as in the Kubernetes job
            report = convert(
                a.source,
                a.dest,
                a.collection,
                clinical=a.clinical,
                overrides=a.overrides,
                storage_options=_storage_options(a.storage_option),
                source_options=_storage_options(a.source_option),
                scheduler=cluster.scheduler_address,
                progress=True,
            )
    finally:
        cluster.close()
    print(report.summary())
    return report.exit_code


if __name__ == "__main__":
    sys.exit(main())
