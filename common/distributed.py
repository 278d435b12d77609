"""Several processes with torchrun: the plumbing every script shares (docs/distributed.md).

    python ogm.py ...                                      one process: every function here is a no-op
    torchrun --nproc_per_node=4 ogm.py ...                 4 processes (GPUs) on one machine
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 ogm.py ...   2 machines

`--batch-size` stays the *global* batch, split evenly over the processes, so the presets keep their meaning. DDP
averages the gradients; every statistic a method computes from the batch goes through `all_reduce_sum` before it is
used, so all processes use the global batch's value and the replicas never drift apart. BatchNorm keeps per-process
batch statistics (DDP's default). Only rank 0 writes logs, checkpoints and results, and prints.
"""

import atexit
import os
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


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


def init_process_group(args):
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT); no-op without it.

    GPU: one device per process (args.device becomes cuda:LOCAL_RANK), NCCL. CPU: gloo. Only rank 0 shows a progress
    bar (args.no_progress is set on the others); common/runs.py prints on rank 0 only.
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
    atexit.register(_shutdown)


def _shutdown():
    """At exit, while the interpreter is still whole: leave the process group, then let gloo's workers go idle.

    A DistributedDataParallel model keeps the gloo process group alive after destroy_process_group (PyTorch 2.14), so
    its worker threads outlive it. A gradient all-reduce that DDP started in backward holds a Python object, and the
    worker drops it after the main thread has moved on; if that happens during interpreter shutdown, the process
    aborts ("terminate called without an active exception", SIGABRT) after a run that finished. Waiting here until no
    worker is runnable (Linux: /proc) removes that window; tests/test_distributed.py runs the case.
    """
    if active():
        dist.destroy_process_group()
    wait_for_idle_gloo_workers()


def _gloo_workers_running():
    """How many of this process's gloo worker threads are runnable (0 where /proc is missing)."""
    running = 0
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return 0
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().strip() != "pt_gloo_runloop":
                    continue
            with open(f"/proc/self/task/{tid}/stat") as f:
                running += f.read().rsplit(")", 1)[1].split()[0] == "R"
        except OSError:  # the thread ended
            continue
    return running


def wait_for_idle_gloo_workers(timeout=5.0):
    """Sleep (releasing the GIL, which a worker may need) until two checks in a row find no gloo worker runnable."""
    end, idle = time.monotonic() + timeout, 0
    while idle < 2 and time.monotonic() < end:
        time.sleep(0.005)
        idle = idle + 1 if _gloo_workers_running() == 0 else 0


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
    dist.all_reduce(t)
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
def ddp(forward, args, find_unused=False, enabled=True):
    """Under torchrun: DistributedDataParallel around `forward` (common/speed.py's TrainForward), which averages the
    gradients of the backward pass that follows each forward. enabled=False, for steps DDP cannot follow (aug.py's two
    optimizer steps per batch, dgl.py --dgl-impl two-pass; the script averages with `sync_grads`): rank 0's weights
    are copied to every process instead, as DDP does when it starts. One process: `forward` itself.
    find_unused: parameters that get no gradient in some steps (DDP must then search the graph every step).
    """
    if not active():
        return forward
    if not enabled:
        broadcast_module(forward)
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


def broadcast_buffers(model):
    """Rank 0's buffers (BatchNorm running statistics) in every process, after the training loop: what evaluation and
    the checkpoint use (DDP broadcasts them only before each forward, and aug.py runs without DDP). No-op in one
    process."""
    if active():
        for b in model.buffers():
            dist.broadcast(b, 0)
