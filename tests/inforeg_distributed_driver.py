"""Run by tests/test_inforeg.py as `torchrun --standalone --nproc_per_node=2 tests/inforeg_distributed_driver.py
JOBS.json`: first the block's step on a BatchNorm-free model (tests/mlp_toy.py) with half of a global batch per
process (results to <out>/block_rank<r>.json; `block_steps(None)` is the same on the whole batch in one process), then
each job: inforeg.py run end to end with runpy, exactly as `python inforeg.py <argv>`, traced (tools/trace.py).
"""

import json
import os
import sys
from types import SimpleNamespace

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]

from distributed_driver import run_jobs  # noqa: E402
from mlp_toy import MLPModel, make_data, split_logits  # noqa: E402

import inforeg  # noqa: E402
from common import distributed  # noqa: E402


def block_steps(out):
    """3 steps of the block's loop (release variant, window value 1: the pull acts from the second step) on
    mlp_toy's model in float64, global batch 16: one process on the whole batch, or, under torchrun, each process on
    its half with DDP (scores summed over the processes, the FIM read from the averaged gradient)."""
    model = MLPModel(seed=3).double()
    forward = torch.nn.parallel.DistributedDataParallel(model) if distributed.active() else model
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    x_a, x_v, y = make_data(48, seed=4)
    enc_a, enc_v = list(model.audio_net.parameters()), list(model.visual_net.parameters())
    anchor_a, anchor_v = inforeg.snapshot(enc_a), inforeg.snapshot(enc_v)
    w_a, w_v = inforeg.fim_weights(model.audio_net), inforeg.fim_weights(model.visual_net)
    fim_a, fim_v = inforeg.fim_zeros(w_a), inforeg.fim_zeros(w_v)
    res = {"betas": [], "local_betas": []}
    r, w = distributed.rank(), distributed.world_size()
    for i in range(3):
        rows = slice(16 * i + r * 16 // w, 16 * i + (r + 1) * 16 // w)
        a, v, z = forward(x_a[rows].double(), x_v[rows].double())
        z_a, z_v = split_logits(model.head, a, v, "half")
        loss, _ = inforeg.inforeg_loss(z, z_a, z_v, y[rows], True)
        s = inforeg.inforeg_scores(z_a, z_v, y[rows], distributed.all_reduce_sum)
        own = inforeg.inforeg_scores(z_a, z_v, y[rows])
        beta_a, beta_v = inforeg.release_coefficients(s[0], s[1], 1.0)
        res["betas"].append([beta_a, beta_v])
        res["local_betas"].append(list(inforeg.release_coefficients(own[0], own[1], 1.0)))
        opt.zero_grad()
        loss.backward()
        inforeg.proximal_pull(enc_a, anchor_a, beta_a)
        inforeg.proximal_pull(enc_v, anchor_v, beta_v)
        inforeg.fim_accumulate(fim_a, w_a)
        inforeg.fim_accumulate(fim_v, w_v)
        opt.step()
    res["traces"] = [inforeg.fim_trace(fim_a), inforeg.fim_trace(fim_v)]
    res["params"] = torch.cat([p.detach().flatten() for p in model.parameters()]).tolist()
    if out is not None:
        with open(os.path.join(out, f"block_rank{r}.json"), "w") as f:
            json.dump(res, f)
    return res


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        jobs = json.load(f)
    distributed.init_process_group(SimpleNamespace(device="cpu", no_progress=False))
    block_steps(jobs["out"])
    run_jobs(jobs)
