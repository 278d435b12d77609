"""Several processes with torchrun, and the speed flags: the plumbing every script shares (docs/distributed.md).

    python ogm.py ...                                      one process: every function here is a no-op
    torchrun --nproc_per_node=4 ogm.py ...                 4 processes (GPUs) on one machine
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 ogm.py ...   2 machines

`--batch-size` stays the *global* batch, split evenly over the processes, so the presets keep their meaning. DDP
averages the gradients; every statistic a method computes from the batch goes through `all_reduce_sum` before it is
used, so all processes use the global batch's value and the replicas never drift apart. BatchNorm keeps per-process
batch statistics (DDP's default). Only rank 0 writes logs, checkpoints and results, and prints.
"""

import atexit
import builtins
import hashlib
import json
import os
import random
import resource
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel


def add_speed_args(parser):
    """Flags for speed only: what is trained stays the same (up to bfloat16 rounding with --amp)."""
    g = parser.add_argument_group("speed")
    g.add_argument(
        "--amp",
        action="store_true",
        help="bfloat16 autocast in the training forward passes (evaluation stays float32); for GPUs or CPUs with bf16",
    )
    g.add_argument("--channels-last", action="store_true",
                   help="channels-last memory format for the encoders (faster convs on GPU)")
    g.add_argument("--compile", action="store_true", help="torch.compile the two encoders (slow first steps)")
    g.add_argument("--cudnn-benchmark", action="store_true",
                   help="let cuDNN pick the fastest (non-deterministic) kernels")
    g.add_argument("--pin-memory", default="auto", choices=["auto", "on", "off"],
                   help="pinned host memory for batches (auto: on with CUDA)")
    g.add_argument(
        "--persistent-workers",
        action="store_true",
        help="keep the training loader's workers between epochs (the test loader always does); --resume is then "
        "no longer bitwise exact, because worker seeds are drawn once instead of per epoch",
    )
    return parser


# ---------------------------------------------------------------------------------------------------------------
# Process group
# ---------------------------------------------------------------------------------------------------------------
def active():
    return dist.is_available() and dist.is_initialized()


def rank():
    return dist.get_rank() if active() else 0


def world_size():
    return dist.get_world_size() if active() else 1


def is_main():
    return rank() == 0


def init(args):
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT); no-op without it.

    GPU: one device per process (cuda:LOCAL_RANK), NCCL. CPU: gloo. Other ranks print nothing and show no progress bar.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or active():
        return
    local_rank = int(os.environ["LOCAL_RANK"])
    if args.device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        args.device = f"cuda:{local_rank}"
    dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    if not is_main():
        args.no_progress = True
        builtins.print = lambda *a, **k: None
    atexit.register(lambda: dist.destroy_process_group() if active() else None)


def barrier():
    """Wait until every process gets here; no-op in one process."""
    if active():
        dist.barrier()


def _comm_device():
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(x):
    """The sum of `x` over all processes (a tensor, or a list of floats -> list of floats); `x` itself in one process.

    Every process must call it at the same point. Reduce sums and counts, then divide: never average means.
    """
    if not active():
        return x
    is_list = isinstance(x, (list, tuple))
    t = torch.tensor(x, dtype=torch.float64, device=_comm_device()) if is_list else x.detach().clone()
    local = t.tolist() if os.environ.get("BML_TRACE_DIR") else None
    dist.all_reduce(t)
    if local is not None:
        _trace({"reduce": local, "sum": t.tolist()})
    return t.tolist() if is_list else t


def broadcast_object(obj):
    """Rank 0's `obj` on every process (e.g. the run folder name)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, 0)
    return box[0]


def broadcast_module(module):
    """Rank 0's parameters and buffers in every process (e.g. a layer created during training from the global RNG)."""
    if active():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, 0)


def local_rows(t):
    """This process's share of a tensor drawn for the global batch: rank r holds rows r*B .. (r+1)*B - 1."""
    return t.chunk(world_size())[rank()] if active() else t


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------
def samplers(train_set, test_set):
    """(train, test) DistributedSamplers under torchrun, (None, None) in one process.

    Training: an even shard of the epoch's shuffle (the last len % world clips are left out, as drop_last leaves out a
    partial batch). Test: every clip, in order, rank r takes clips r, r + W, ...; the sampler pads with repeats of
    the first clips so shards are equal, and `gather_in_order` removes them again.
    """
    if not active():
        return None, None
    train = torch.utils.data.DistributedSampler(train_set, shuffle=True, seed=0, drop_last=True)
    test = torch.utils.data.DistributedSampler(test_set, shuffle=False, drop_last=False)
    return train, test


def set_epoch(loader):
    """Call right after reseeding the loader's generator for the epoch. Under torchrun: the same shuffle on every
    process (from that seed), this process's shard of it, and an augmentation stream of its own (seed, rank), so
    the epoch still depends only on (seed, epoch) and --resume stays exact. No-op in one process."""
    if not active():
        return
    seed = loader.generator.initial_seed()
    loader.sampler.set_epoch(seed)
    own = seed * 1_000_003 + rank()  # workers' base seed, and the main process's RNGs (augmentation with 0 workers)
    loader.generator.manual_seed(own)
    torch.manual_seed(own)
    random.seed(own)
    np.random.seed(own % 2**32)


def gather_in_order(t, n_total):
    """All processes' test outputs (rank r's rows are clips r, r + W, ...) as one tensor in dataset order, the
    sampler's padding repeats removed: every test clip counts once. `t` itself in one process."""
    if not active():
        return t
    n = torch.tensor([t.shape[0]], device=_comm_device())
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    assert len({int(s) for s in sizes}) == 1, "every process evaluates the same number of test batches"
    parts = [torch.empty_like(t, device=_comm_device()) for _ in range(world_size())]
    dist.all_gather(parts, t.to(_comm_device()))
    return torch.stack(parts, 1).flatten(0, 1)[:n_total].to(t.device)  # row i*W + r = rank r's i-th = clip i*W + r


# ---------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------
class TrainForward(nn.Module):
    """`train_forward(fn)` runs `fn(model)`, the script's training forward pass, under bfloat16 autocast with --amp,
    returning float32 outputs, so the losses and every statistic stay float32. It is the module DDP wraps, so DDP
    sees each training forward and averages the gradients of the backward pass that follows.
    With --amp the returned float32 tensors are new tensors (casts of the bfloat16 ones `fn` computed): gradient
    surgery belongs inside `fn` (e.g. arl.py's GradScale), since a hook on a returned copy misses the gradient that
    reaches the original through the rest of `fn`'s graph."""

    def __init__(self, model, amp=False):
        super().__init__()
        self.model, self.amp = model, amp

    def forward(self, fn):
        if not self.amp:
            return fn(self.model)
        device_type = next(self.model.parameters()).device.type
        with torch.autocast(device_type, dtype=torch.bfloat16):
            return _float32(fn(self.model))


def _float32(out):
    if isinstance(out, torch.Tensor):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, (list, tuple)):
        return type(out)(_float32(o) for o in out)
    if isinstance(out, dict):
        return {k: _float32(v) for k, v in out.items()}
    return out


def wrap(model, args, ddp=True, find_unused=False):
    """Apply the speed flags to `model` (in place) and return `train_forward`: `train_forward(fn)` = `fn(model)`.

    ddp=True: under torchrun, DistributedDataParallel around TrainForward(model): one forward, one backward per step.
    ddp=False: the script averages gradients itself with `sync_grads` (several backward passes per forward).
    find_unused: parameters that get no gradient in some steps (DDP must then search the graph every step).
    """
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.cudnn_benchmark:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = True, False
    if args.compile:
        model.audio_net.compile()
        model.visual_net.compile()
    forward = TrainForward(model, args.amp)
    if not active():
        return forward
    if not ddp:
        broadcast_module(model)
        return forward
    device_ids = [torch.cuda.current_device()] if args.device.startswith("cuda") else None
    return DistributedDataParallel(forward, device_ids=device_ids, find_unused_parameters=find_unused)


def sync_grads(model):
    """Average the gradients over the processes, as DDP's backward does, for steps DDP cannot follow (aug.py's two
    optimizer steps per batch, dgl.py --dgl-impl two-pass). Missing gradients stay missing. No-op in one process."""
    if not active():
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if grads:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= world_size()
        for g, new in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(new.view_as(g))


def finish_epoch(model, sums, n_samples):
    """After the training loop: rank 0's BatchNorm running statistics in every process (what evaluation and the
    checkpoint use; DDP broadcasts them only before each forward, and aug.py runs without DDP), the logged per-step
    values averaged over processes, and the sample count summed (charts/samples_per_sec is the global rate).
    Returns (sums, n_samples)."""
    if not active():
        return sums, n_samples
    for b in model.buffers():
        dist.broadcast(b, 0)
    keys = sorted(sums)
    total = all_reduce_sum([sums[k] for k in keys] + [float(n_samples)])
    return {k: v / world_size() for k, v in zip(keys, total)}, int(total[-1])


# ---------------------------------------------------------------------------------------------------------------
# Trace (tests/test_distributed.py, preprocess/benchmark.py)
# ---------------------------------------------------------------------------------------------------------------
def _trace(record):
    trace_dir = os.environ["BML_TRACE_DIR"]
    os.makedirs(trace_dir, exist_ok=True)
    with open(os.path.join(trace_dir, f"rank{rank()}.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


def trace_step(model, stats):
    """With $BML_TRACE_DIR set: append this step's logged values, the wall and CPU times, the peak memory (and with
    $BML_TRACE_PARAMS=1 a digest of the parameters) to $BML_TRACE_DIR/rank<r>.jsonl. No-op otherwise."""
    if not os.environ.get("BML_TRACE_DIR"):
        return
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    record = {"step": {k: float(v) for k, v in stats.items()}, "time": time.perf_counter(), "cpu": time.process_time(),
              "peak_mb": peak_mb}
    if os.environ.get("BML_TRACE_PARAMS") == "1":
        h = hashlib.sha1()
        for p in model.parameters():
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
        record["params"] = h.hexdigest()
    _trace(record)
