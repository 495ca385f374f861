"""Deterministic fault injection for the fault-tolerance tests.

A test cannot reliably kill a process "while it works" by polling from outside: the
process may finish first, or die one step earlier or later than intended.  Instead a test
starts the process (a Dask worker, a ``convert`` run) with ``LIVERCUBE_FAULT=POINT:N`` and
the process SIGKILLs itself the N-th time it reaches the named point
(``POINT:N:stop``: SIGSTOPs itself instead, so a test can act while it is frozen there and
then let it go on with SIGCONT).  Unset (always, outside
tests), :func:`fault_point` is a dictionary lookup and nothing else.

Points:

``volume-written``
    a volume group is complete in the store, its task has not returned yet
``shard-written``
    one more shard of a volume's arrays is uploaded (the volume is mid-write, invisible)
``before-group-doc``
    a volume's arrays are uploaded, its group document (completion record) is not
``before-catalog``
    every task has ended, the catalog has not been rebuilt
"""

from __future__ import annotations

import os
import signal
import threading

ENV = "LIVERCUBE_FAULT"
_hits: dict[str, int] = {}
_lock = threading.Lock()


def fault_point(name: str) -> None:
    """SIGKILL this process if ``LIVERCUBE_FAULT`` says so for the N-th hit of ``name``."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    point, _, rest = spec.partition(":")
    if point != name:
        return
    nth, _, action = rest.partition(":")
    with _lock:
        _hits[name] = _hits.get(name, 0) + 1
        due = _hits[name] == int(nth or 1)
    if due:
        os.kill(os.getpid(), signal.SIGSTOP if action == "stop" else signal.SIGKILL)
