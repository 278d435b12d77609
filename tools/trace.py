"""Trace a script's training steps from outside the library (tools/benchmark.py, tests/test_distributed.py):

    python -m tools.trace DIR [--params] SCRIPT [ARGS ...]
    torchrun --nproc_per_node=2 tools/trace.py DIR SCRIPT [ARGS ...]

Writes DIR/rank<r>.jsonl: one line per training step ({"step": the values the script logs, "time", "cpu", "peak_mb"},
with --params also "params", a SHA-1 digest of the parameters after the step) and, under torchrun, one line per
reduction of a statistic over the processes ({"reduce": the local values, "sum": their sum}; a tensor of more than
4096 values: the sums of its elements, and "numel"). It wraps
common.runs.Run (its log_step) and common.distributed.all_reduce_sum, then runs SCRIPT as __main__.
"""

import contextlib
import functools
import hashlib
import json
import os
import resource
import runpy
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_STATE = {"dir": None, "params": False, "model": None}


def _write(record):
    from common import distributed

    os.makedirs(_STATE["dir"], exist_ok=True)
    with open(os.path.join(_STATE["dir"], f"rank{distributed.rank()}.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


def digest(model):
    """SHA-1 of every parameter's float32 bytes, in order."""
    h = hashlib.sha1()
    for p in model.parameters():
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def install(trace_dir, params=False):
    """Trace from now on to `trace_dir` (call again to switch folders; the wrappers are installed once)."""
    from common import distributed, runs

    _STATE.update(dir=trace_dir, params=params)
    if getattr(runs.Run, "_traced", False):
        return
    init, log_step, reduce = runs.Run.__init__, runs.Run.log_step, distributed.all_reduce_sum

    @functools.wraps(init)
    def traced_init(self, args, ckpt, model, *a, **k):
        _STATE["model"] = model
        init(self, args, ckpt, model, *a, **k)

    @functools.wraps(log_step)
    def traced_log_step(self, logs, n_samples):
        model = _STATE["model"]
        device = next(model.parameters()).device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
        else:
            peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
        record = {
            "step": {k: float(v) for k, v in logs.items()},
            "time": time.perf_counter(),
            "cpu": time.process_time(),
            "peak_mb": peak_mb,
        }
        if _STATE["params"]:
            record["params"] = digest(model)
        _write(record)
        return log_step(self, logs, n_samples)

    @functools.wraps(reduce)
    def traced_reduce(x):
        out = reduce(x)
        if distributed.active():
            if isinstance(x, torch.Tensor) and x.numel() > 4096:  # gradients (mmpareto.py): their sums, not the values
                _write({"reduce": [x.double().sum().item()], "sum": [out.double().sum().item()], "numel": x.numel()})
                return out
            local = list(x) if isinstance(x, (list, tuple)) else x.tolist()
            _write({"reduce": local, "sum": out if isinstance(out, list) else out.tolist()})
        return out

    _STATE["originals"] = (init, log_step, reduce)
    runs.Run.__init__, runs.Run.log_step, distributed.all_reduce_sum = traced_init, traced_log_step, traced_reduce
    runs.Run._traced = True


def uninstall():
    """Stop tracing: the library's own functions again."""
    from common import distributed, runs

    if getattr(runs.Run, "_traced", False):
        runs.Run.__init__, runs.Run.log_step, distributed.all_reduce_sum = _STATE["originals"]
        runs.Run._traced = False
    _STATE.update(dir=None, model=None)


@contextlib.contextmanager
def tracing(trace_dir, params=False):
    """`with tracing(dir): ...` traces the runs inside the block (tests)."""
    install(trace_dir, params)
    try:
        yield
    finally:
        uninstall()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2:
        raise SystemExit("usage: python -m tools.trace DIR [--params] SCRIPT [ARGS ...]")
    trace_dir, argv = argv[0], argv[1:]
    params = argv[0] == "--params"
    argv = argv[1:] if params else argv
    sys.path.insert(0, ROOT)
    install(trace_dir, params)
    sys.argv = argv
    runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
