"""The threads scheduler's graph runner: retries, failures handed back, results as they end."""

from __future__ import annotations

import threading

import pytest

from livercube.local_graph import TaskFailure, run_threaded


def test_every_item_once_with_its_arguments():
    out = dict(run_threaded(lambda x, k: x * k, [1, 2, 3, 4], (10,), threads=2, retries=0))
    assert out == {0: 10, 1: 20, 2: 30, 3: 40}


def test_a_task_that_raises_is_retried_then_handed_back():
    calls: dict[int, int] = {}
    lock = threading.Lock()

    def flaky(x: int) -> int:
        with lock:
            calls[x] = calls.get(x, 0) + 1
            n = calls[x]
        if x == 1 and n < 3:  # fails twice, then succeeds on its last retry
            raise OSError("transient")
        if x == 2:
            raise ValueError(f"bad input {x}")
        return x

    out = dict(run_threaded(flaky, [0, 1, 2], threads=2, retries=2))
    assert out[0] == 0 and out[1] == 1
    assert calls == {0: 1, 1: 3, 2: 3}
    failure = out[2]
    assert isinstance(failure, TaskFailure)
    assert isinstance(failure.error, ValueError) and "bad input 2" in str(failure.error)
    assert "flaky" in failure.traceback  # the task's own frame, not the scheduler's


def test_results_reach_the_caller_while_later_tasks_still_run():
    """Task 1 only ends once the caller has seen task 0's result: a runner that handed
    results over only at the end would make task 1 wait out its timeout and fail."""
    seen_first = threading.Event()

    def task(i: int) -> str:
        if i == 1 and not seen_first.wait(timeout=30):
            raise TimeoutError("the first result never reached the caller")
        return f"done {i}"

    order = []
    for i, result in run_threaded(task, [0, 1], threads=2, retries=0):
        order.append((i, result))
        if i == 0:
            seen_first.set()
    assert order == [(0, "done 0"), (1, "done 1")]


def test_items_that_look_like_graph_tasks_are_passed_through_untouched():
    """A tuple starting with a callable is a task to Dask's legacy graph spec; an item must
    reach the function as it is, not be run by the scheduler."""
    item = (len, [1, 2, 3])
    out = dict(run_threaded(lambda x: x, [item], threads=1, retries=0))
    assert out[0] is item


def test_no_items_nothing_runs():
    assert list(run_threaded(pytest.fail, [], threads=2, retries=0)) == []


def test_a_caller_that_stops_early_waits_for_running_tasks_and_starts_no_more():
    """Closing the iterator (as an error in the caller's loop does) returns only when the
    running tasks have ended, and none of the rest starts: no write behind its back."""
    started, finished = [], []
    lock = threading.Lock()
    release = threading.Event()

    def task(i: int) -> int:
        with lock:
            first = not started
            started.append(i)
        if not first:
            release.wait(timeout=30)  # still running when the caller stops
        with lock:
            finished.append(i)
        return i

    results = run_threaded(task, list(range(20)), threads=2, retries=0)
    i, result = next(results)
    assert result == i
    threading.Timer(0.2, release.set).start()
    results.close()
    with lock:
        assert sorted(finished) == sorted(started)  # nothing was still running
        assert len(started) <= 3  # the first, the one running beside it, at most one more
    assert release.is_set()  # close() did wait for the running task
