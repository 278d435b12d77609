"""Run folders, TensorBoard + per-epoch metrics + results.json, atomic checkpoints, RNG capture, resume."""

import json
import os
import random
import time

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter

from common.distributed import broadcast_object, is_main

# flags that describe *how* to run, not *what* to train: on --resume/--eval-only these come from the command line
OPERATIONAL_FLAGS = {"resume", "stop_after_epochs", "eval_only", "checkpoint", "device", "num_workers", "data_root",
                     "no_progress", "runs_dir", "channels_last", "compile", "cudnn_benchmark", "pin_memory",
                     "persistent_workers"}


def apply_preset(args, presets):
    """Fill every flag left at None from the per-dataset preset table of the script."""
    for key, value in presets[args.dataset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    for key in ("epochs", "batch_size", "lr"):
        value = getattr(args, key, None)
        if value is not None and value <= 0:
            raise SystemExit(f"--{key.replace('_', '-')} must be positive, got {value}")
    return args


def run_name(args, script):
    return f"{args.dataset}__{script}__{args.seed}__{int(time.time())}"


def make_run_dir(runs_dir, name):
    """Create runs_dir/name (rank 0 under torchrun; the other processes get its path)."""
    path = None
    if is_main():
        path, k = os.path.join(runs_dir, name), 1
        while os.path.exists(path):  # two runs started in the same second
            path, k = os.path.join(runs_dir, f"{name}_{k}"), k + 1
        os.makedirs(path)
    return broadcast_object(path)


def capture_rng():
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, state):
    """Write atomically (temp file + rename), so an interruption never leaves a truncated checkpoint. Rank 0 only."""
    if not is_main():
        return
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} not found; pass --checkpoint PATH/best.pt or --resume RUN_DIR")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file
        raise ValueError(f"{path}: not a readable checkpoint ({e})") from e


def merge_saved_args(args, saved):
    """On --resume / --eval-only: the saved run's settings win, except the operational flags given now."""
    for key, value in saved.items():
        if key not in OPERATIONAL_FLAGS:
            setattr(args, key, value)
    return args


class RunLogger:
    """runs/<name>/: TensorBoard scalars, metrics.jsonl (one line per epoch) and results.json at the end.
    Under torchrun only rank 0 writes (the others return the same results without writing)."""

    def __init__(self, run_dir, args, resume_epoch=None):
        self.run_dir, self.writes = run_dir, is_main()
        if not self.writes:
            return
        self.writer = SummaryWriter(run_dir)
        self.metrics_path = os.path.join(run_dir, "metrics.jsonl")
        if resume_epoch is None:
            table = "\n".join(f"|{k}|{v}|" for k, v in sorted(vars(args).items()))
            self.writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")
            with open(os.path.join(run_dir, "args.json"), "w") as f:
                json.dump(vars(args), f, indent=1, sort_keys=True)
        elif os.path.isfile(self.metrics_path):  # drop epochs logged after the checkpoint we resume from
            with open(self.metrics_path) as f:
                keep = [line for line in f if line.strip() and json.loads(line)["epoch"] <= resume_epoch]
            with open(self.metrics_path, "w") as f:
                f.writelines(keep)

    def log_epoch(self, epoch, metrics):
        if not self.writes:
            return
        for key, value in metrics.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, epoch)
        self.writer.flush()
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({"epoch": epoch, **metrics}) + "\n")

    def finish(self, args, script, history, best, wall_time):
        last = history[-1] if history else {}
        results = {
            "script": script,
            "dataset": args.dataset,
            "seed": args.seed,
            "args": vars(args),
            "best": best,
            "last": last,
            "epochs_run": len(history),
            "wall_time_sec": wall_time,
            "seconds_per_epoch": wall_time / max(1, len(history)),
        }
        if self.writes:
            with open(os.path.join(self.run_dir, "results.json"), "w") as f:
                json.dump(results, f, indent=1, sort_keys=True)
            self.writer.close()
        return results


def format_metrics(m):
    keys = ("train/loss", "test/acc", "test/acc_audio", "test/acc_visual", "test/macro_f1")
    return " ".join(f"{k.split('/')[1]}={m[k]:.4f}" for k in keys if k in m)
