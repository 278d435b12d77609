"""The exit of a torchrun process (common/distributed.py, `_shutdown`): leave the process group, then wait until no
gloo worker thread is runnable, so that none drops a Python object during interpreter shutdown.

The crash it prevents is a race (a few launches in a hundred on a loaded 2-core machine); its rate with and without
the wait is measured by `python -m tools.torchrun_exit_check` (docs/distributed.md), not here. These tests check the
parts: the wait's stopping rule, the thread count read from /proc, and the order of the shutdown.
"""

import ctypes
import os
import sys
import threading
import time

import pytest
import torch
import torch.distributed as dist

from common import distributed

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def test_the_wait_ends_after_two_idle_checks_in_a_row(monkeypatch):
    counts = iter([2, 1, 0, 1, 0, 0, 5, 5])
    seen = []

    def running():
        seen.append(next(counts))
        return seen[-1]

    monkeypatch.setattr(distributed, "_gloo_workers_running", running)
    sleeps = []
    monkeypatch.setattr(distributed.time, "sleep", sleeps.append)
    distributed.wait_for_idle_gloo_workers()
    assert seen == [2, 1, 0, 1, 0, 0]  # one idle check is not enough, a busy one starts the count again
    assert len(sleeps) == 6 and all(s > 0 for s in sleeps)  # each check after a sleep, which frees the GIL


def test_the_wait_gives_up_after_its_timeout(monkeypatch):
    monkeypatch.setattr(distributed, "_gloo_workers_running", lambda: 1)
    t0 = time.monotonic()
    distributed.wait_for_idle_gloo_workers(timeout=0.05)
    assert time.monotonic() - t0 >= 0.05  # it waited, and it returned


def _named_spinner(name, stop):
    """A thread that renames itself (as gloo's workers are named) and computes without the GIL until stopped."""
    libc = ctypes.CDLL(None)
    libc.prctl(15, name.encode(), 0, 0, 0)  # PR_SET_NAME: this thread's /proc/self/task/<tid>/comm
    a = torch.randn(256, 256)
    while not stop.is_set():
        for _ in range(20):
            a = torch.tanh(a @ a)  # matmul releases the GIL: the thread is runnable ("R") while it computes


@linux
@pytest.mark.parametrize("name, counted", [("pt_gloo_runloop", True), ("other_thread", False)])
def test_runnable_gloo_workers_are_counted_by_name(name, counted):
    stop = threading.Event()
    thread = threading.Thread(target=_named_spinner, args=(name, stop))
    thread.start()
    try:
        time.sleep(0.05)
        seen = []
        for _ in range(40):  # the spinner is between two matmuls (waiting for the GIL) only for moments
            seen.append(distributed._gloo_workers_running())
            time.sleep(0.005)
    finally:
        stop.set()
        thread.join()
    assert max(seen) == (1 if counted else 0), seen
    for _ in range(400):  # join returns before the OS thread has quite ended
        if distributed._gloo_workers_running() == 0:
            break
        time.sleep(0.005)
    assert distributed._gloo_workers_running() == 0  # the thread is gone


@linux
def test_idle_gloo_workers_are_not_counted_and_shutdown_leaves_the_group(tmp_path, monkeypatch):
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        t = torch.ones(3)
        dist.all_reduce(t)
        names = [open(f"/proc/self/task/{tid}/comm").read().strip() for tid in os.listdir("/proc/self/task")]
        assert "pt_gloo_runloop" in names  # the threads the wait looks for exist, under this name
        for _ in range(1000):  # a loaded machine may take a while to schedule the worker's last lines
            if distributed._gloo_workers_running() == 0:
                break
            time.sleep(0.005)
        assert distributed._gloo_workers_running() == 0  # waiting for work: not runnable
        calls = []
        monkeypatch.setattr(distributed, "wait_for_idle_gloo_workers", lambda: calls.append(distributed.active()))
        distributed._shutdown()
        assert calls == [False]  # the wait comes after the group is left
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
