"""How often does a finished torchrun run crash at exit? A stress check of common/distributed.py's shutdown.

    python -m tools.torchrun_exit_check                 # 60 launches with the wait for idle gloo workers, 60 without
    python -m tools.torchrun_exit_check --launches 20   # a quick look

Each launch is `torchrun --standalone --nproc_per_node=2` of this file's child: a DDP model on the gloo backend (the
CPU path every script takes), three training steps, then rank 1 exits at once while rank 0 waits 0.3 s, the case
in which a worker thread of gloo may still hold a gradient all-reduce started in backward when the interpreter
shuts down (SIGABRT, "terminate called without an active exception"). Launches alternate between the two
conditions, so both see the same machine load. It prints the failed exits per condition; nothing is asserted:
the crash is a race, so a count of 0 bounds its rate, it does not prove it gone.
"""

import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(drain):
    """One torchrun process: DDP steps, then exit (rank 1 at once)."""
    from types import SimpleNamespace

    import torch

    sys.path.insert(0, ROOT)
    from common import distributed

    distributed.init_process_group(SimpleNamespace(device="cpu", no_progress=True))
    if not drain:  # the shutdown without the wait: leave the process group only
        distributed.wait_for_idle_gloo_workers = lambda: None
    model = distributed.ddp(torch.nn.Linear(64, 8), SimpleNamespace(device="cpu"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        model(torch.randn(4, 64)).sum().backward()
        opt.step()
        opt.zero_grad()
    if distributed.rank() == 0:
        time.sleep(0.3)


def launch(drain):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, "--child"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd + ([] if drain else ["--no-drain"]), capture_output=True, text=True, env=env)
    return proc.returncode == 0, "SIGABRT" in proc.stdout + proc.stderr


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--launches", type=int, default=60, help="torchrun launches per condition (default 60)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no-drain", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(not args.no_drain)
    failed = {True: 0, False: 0}
    aborts = {True: 0, False: 0}
    t0 = time.time()
    for i in range(args.launches):
        for drain in (True, False) if i % 2 == 0 else (False, True):
            ok, abort = launch(drain)
            failed[drain] += not ok
            aborts[drain] += abort
    print(f"{args.launches} launches per condition, {time.time() - t0:.0f} s")
    for drain, name in ((True, "shutdown with the wait for idle gloo workers"), (False, "without the wait")):
        print(f"{name}: {failed[drain]} failed exits ({aborts[drain]} SIGABRT)")


if __name__ == "__main__":
    main()
