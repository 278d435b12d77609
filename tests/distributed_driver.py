"""Run by tests/test_distributed.py as `torchrun --standalone --nproc_per_node=2 tests/distributed_driver.py JOBS.json`.

In one 2-process gloo group (one start-up for everything): first the shared statistics functions on this process's
half of a fixed global batch (results to <out>/functions_rank<r>.json, compared with one process by the test), then
each job: a script run end to end with runpy, exactly as `python <script> <argv>`, tracing every step to its folder
(tools/trace.py, with parameter digests).
"""

import gc
import glob
import json
import os
import runpy
import sys
from types import SimpleNamespace

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import arl  # noqa: E402
import ogm  # noqa: E402
import opm  # noqa: E402
from common import distributed  # noqa: E402
from tools import trace  # noqa: E402


def resolve(arg, out):
    """ "{RUN:name}" -> the run folder an earlier job wrote under <out>/runs/name (for --resume jobs)."""
    if not arg.startswith("{RUN:"):
        return arg
    (run_dir,) = glob.glob(os.path.join(out, "runs", arg[len("{RUN:") : -1], "*"))
    return run_dir


def local_rows(t):
    """This process's share of a tensor drawn for the global batch: rank r holds rows r*B .. (r+1)*B - 1."""
    return t.chunk(distributed.world_size())[distributed.rank()]


def global_batch():
    """The fixed global batch (12 samples, 5 classes) the test also builds in a single process."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(12, 5, generator=g) * 3, torch.randn(12, 5, generator=g), torch.randint(5, (12,), generator=g)


def function_checks(out):
    r, w = distributed.rank(), distributed.world_size()
    z_a, z_v, y = global_batch()
    mine = slice(r * 12 // w, (r + 1) * 12 // w)
    # as the scripts call them: the batch statistics summed over the processes
    ogm_s = distributed.all_reduce_sum(ogm.ogm_scores(z_a[mine], z_v[mine], y[mine]))
    opm_s = distributed.all_reduce_sum(opm.opm_scores(z_a[mine], z_v[mine], y[mine]))
    arl_c = arl.arl_coefficients(z_a[mine], z_v[mine], 8.0, reduce=distributed.all_reduce_sum)
    res = {
        "ogm_scores": [s.item() for s in ogm_s],
        "opm_scores": [s.item() for s in opm_s],
        "arl": {k: v.item() for k, v in arl_c.items()},
    }
    gen = torch.Generator().manual_seed(3)
    keep_a, keep_v = opm.feature_masks(0.5, 0.0, 6 * w, gen)  # as opm.py: drawn for the global batch, local rows kept
    res["opm_masks"] = [local_rows(keep_a).tolist(), local_rows(keep_v).tolist()]
    test_set = list(range(13))  # a test split that does not divide evenly: the sampler pads, the gather removes it
    _, sampler = distributed.samplers(test_set, test_set)
    res["gathered"] = distributed.gather_in_order(torch.tensor(list(sampler)), len(test_set)).tolist()
    model = torch.nn.Linear(3, 2)
    model.weight.grad = torch.full((2, 3), float(r + 1))  # bias.grad stays None (must stay None)
    distributed.sync_grads(model)
    res["synced_grad"], res["bias_grad_none"] = model.weight.grad.tolist(), model.bias.grad is None
    res["reduced_floats"] = distributed.all_reduce_sum([1.5, float(r)])
    with open(os.path.join(out, f"functions_rank{r}.json"), "w") as f:
        json.dump(res, f)


def run_jobs(jobs):
    """Each job of jobs["runs"]: its script run end to end with runpy, exactly as `python <script> <argv>`, traced
    (tools/trace.py, with parameter digests) to job["trace"]; also tests/inforeg_distributed_driver.py's loop."""
    for job in jobs["runs"]:
        trace.install(job["trace"], params=True)
        sys.argv = [job["script"], *(resolve(a, jobs["out"]) for a in job["argv"])]
        try:
            runpy.run_path(os.path.join(ROOT, job["script"]), run_name="__main__")
        except SystemExit as e:
            if e.code not in (0, None):
                raise
        torch.distributed.barrier()  # rank 0 has written its checkpoints before any process starts the next job
        gc.collect()


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        jobs = json.load(f)
    distributed.init_process_group(SimpleNamespace(device="cpu", no_progress=False))
    function_checks(jobs["out"])
    run_jobs(jobs)
