"""One training run: its folder, logs and checkpoints, --resume, --eval-only and --stop-after-epochs.

    runs/<dataset>__<script>__<seed>__<unix time>/
        args.json          the settings
        metrics.jsonl      one line per epoch (train/*, test/*, charts/*, data/*)
        events.out.tfevents.*   the same values for TensorBoard
        last.pt            the resumable checkpoint, rewritten every epoch (not with --no-save)
        best.pt            with --save-best: the weights of the epoch with the best test accuracy
        results.json       at the end: the best-epoch and last-epoch metrics, the wall time

Only rank 0 writes under torchrun. Nothing here is method logic.
"""

import json
import os
import random
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from common import distributed
from common.data import LoadFailedWarning
from common.flags import OPERATIONAL


def saved_run(args):
    """(args, checkpoint): on --resume / --eval-only the checkpoint, whose saved settings replace every flag but the
    operational ones (common/flags.py); otherwise (args, None)."""
    if not (args.resume or args.eval_only):
        return args, None
    ckpt = load_checkpoint(os.path.join(args.resume, "last.pt") if args.resume else args.checkpoint)
    for key, value in ckpt["args"].items():
        if key not in OPERATIONAL:
            setattr(args, key, value)
    return args, ckpt


def print_evaluation(path, ckpt, model, evaluate_fn):
    """--eval-only: load the checkpoint's weights into `model` and print `evaluate_fn()`'s metrics."""
    model.load_state_dict(ckpt["model"])
    model.eval()
    metrics = evaluate_fn()
    if distributed.is_main():
        print(f"{path} (epoch {ckpt['epoch']}): {format_metrics(metrics)}")


@torch.no_grad()
def branch_logs(z_a, z_v, label):
    """The logged per-branch values of a step: train/loss_audio, train/loss_visual (the unimodal cross-entropies) and
    train/ratio = s_a / s_v, the ratio of the summed true-class probabilities. A branch given as None is left out."""
    logs = {}
    for key, z in (("train/loss_audio", z_a), ("train/loss_visual", z_v)):
        if z is not None:
            logs[key] = F.cross_entropy(z, label).item()
    if z_a is not None and z_v is not None:
        s_a = torch.softmax(z_a, 1).gather(1, label[:, None]).sum()
        s_v = torch.softmax(z_v, 1).gather(1, label[:, None]).sum()
        logs["train/ratio"] = (s_a / s_v).item()
    return logs


class Run:
    """One training run: its folder, logs and checkpoints.

    Created after the model, optimizer and scheduler: with --resume it loads their state and the RNG state from
    RUN_DIR/last.pt (the script restores its method's extra state itself) and continues at `start_epoch`.
    Per epoch: `begin_epoch()`, `log_step(logs, n)` after every step, `train_metrics(optimizer)` after the loop,
    `end_epoch(epoch, metrics, state)` after evaluation, which returns True when --stop-after-epochs says this process
    is done; `finish()` at the end. `datasets`: the AVDatasets whose failed loads are counted per epoch.
    The best epoch: the highest test/acc (only epochs > select_after; ties_to_later: ties go to the later one).
    """

    def __init__(self, args, ckpt, model, optimizer, scheduler, datasets=(), select_after=-1, ties_to_later=False):
        self.args, self.datasets, self.select_after, self.ties_to_later = args, datasets, select_after, ties_to_later
        self.script = os.path.splitext(os.path.basename(sys.argv[0]))[0]
        self.start_epoch, self.history, self.best, self.elapsed = 0, [], None, 0.0
        self.epochs_this_process, self.stopped, self.main = 0, False, distributed.is_main()
        if args.resume:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            self.start_epoch, self.history, self.best = ckpt["epoch"] + 1, ckpt["history"], ckpt["best"]
            self.elapsed = ckpt["elapsed"]
            restore_rng(ckpt["rng"])
            self.dir = args.resume
            self.say(f"resuming {self.dir} at epoch {self.start_epoch}")
        else:
            self.dir = make_run_dir(args.runs_dir, run_name(args))
        self.logger = RunLogger(self.dir, args, resume_epoch=self.start_epoch - 1 if args.resume else None)
        self.say(f"run folder: {self.dir}")

    def say(self, text):
        """Print on rank 0 only."""
        if self.main:
            print(text)

    def begin_epoch(self):
        self.t0, self.sums, self.n_steps, self.n_samples = time.time(), {}, 0, 0
        self.failures_before = [ds.load_failures.clone() for ds in self.datasets]  # data/replaced_clips

    def log_step(self, logs, n_samples):
        """Add one step's logged values (averaged over the epoch's steps) and its batch size (throughput)."""
        for k, val in logs.items():
            self.sums[k] = self.sums.get(k, 0.0) + val
        self.n_steps, self.n_samples = self.n_steps + 1, self.n_samples + n_samples

    def train_metrics(self, optimizer):
        """The epoch's mean train/* values (under torchrun averaged over the processes). Call after the step loop,
        before scheduler.step()."""
        keys = sorted(self.sums)
        total = distributed.all_reduce_sum([self.sums[k] for k in keys] + [float(self.n_samples)])
        self.n_samples = int(total[-1])  # charts/samples_per_sec: the global rate
        self.lr, self.train_time = optimizer.param_groups[0]["lr"], time.time() - self.t0
        return {k: v / distributed.world_size() / max(1, self.n_steps) for k, v in zip(keys, total)}

    def end_epoch(self, epoch, metrics, state, best_state=None):
        """Log the epoch, save last.pt (`state` plus the run's bookkeeping) and, with --save-best, best.pt (the weights
        of `best_state`, default `state`) atomically, and print. Returns True after --stop-after-epochs epochs of this
        process (the run then continues with --resume)."""
        metrics.update(
            {
                "charts/lr": self.lr,
                "charts/samples_per_sec": self.n_samples / max(self.train_time, 1e-9),
                "charts/epoch_time": time.time() - self.t0,
            }
        )
        metrics["data/replaced_clips"] = self.replaced_clips(epoch)
        self.history.append({"epoch": epoch, **metrics})
        self.logger.log_epoch(epoch, metrics)
        acc, best_acc = metrics["test/acc"], None if self.best is None else self.best["test/acc"]
        is_best = epoch > self.select_after and (
            best_acc is None or acc > best_acc or (self.ties_to_later and acc == best_acc)
        )
        self.best = {"epoch": epoch, **metrics} if is_best else self.best
        self.elapsed += time.time() - self.t0
        saved = {"epoch": epoch, "history": self.history, "best": self.best, "args": vars(self.args)}
        if is_best and self.args.save_best:  # weights only: no optimizer or scheduler state
            weights = {k: v for k, v in (best_state or state).items() if k not in ("optimizer", "scheduler")}
            save_checkpoint(os.path.join(self.dir, "best.pt"), {**weights, **saved})
        if not self.args.no_save:
            run_state = {"elapsed": self.elapsed, "rng": capture_rng()}
            save_checkpoint(os.path.join(self.dir, "last.pt"), {**state, **saved, **run_state})
        self.say(f"epoch {epoch}: {format_metrics(metrics)} ({metrics['charts/epoch_time']:.1f}s)")
        self.epochs_this_process += 1
        stop = self.args.stop_after_epochs
        self.stopped = bool(stop and self.epochs_this_process >= stop and epoch + 1 < self.args.epochs)
        return self.stopped

    def replaced_clips(self, epoch):
        """Clips that failed to load in this epoch's training and evaluation, each replaced by the next clip (summed
        over processes; DataLoader workers count into shared memory); a warning names the first ones."""
        n, ids = 0, []
        for ds, before in zip(self.datasets, self.failures_before):
            delta = ds.load_failures - before if before.shape == ds.load_failures.shape else ds.load_failures
            n += int(delta.sum())
            ids += [ds.clips[k].clip_id for k in delta.nonzero().flatten().tolist()]
        n = int(distributed.all_reduce_sum([float(n)])[0])
        if n and self.main:
            warnings.warn(
                f"epoch {epoch}: replaced {n} clips that failed to load by the next clip (first: "
                f"{', '.join(ids[:3])}); fix or remove their files",
                LoadFailedWarning,
                stacklevel=3,
            )
        return n

    def finish(self):
        """Write results.json and print the best and last epochs; after --stop-after-epochs, say how to continue."""
        if self.stopped:
            self.say(f"stopping after {self.epochs_this_process} epochs; continue with --resume {self.dir}")
            return None
        results = self.logger.finish(self.args, self.script, self.history, self.best, self.elapsed)
        self.say(f"best epoch {self.best['epoch']}: {format_metrics(self.best)}")
        self.say(f"last epoch: {format_metrics(results['last'])}")
        self.say(f"results: {os.path.join(self.dir, 'results.json')}")
        return results


def run_name(args):
    return f"{args.dataset}__{args.exp_name}__{args.seed}__{int(time.time())}"


def make_run_dir(runs_dir, name):
    """Create runs_dir/name (rank 0 under torchrun; the other processes get its path)."""
    path = None
    if distributed.is_main():
        path, k = os.path.join(runs_dir, name), 1
        while os.path.exists(path):  # two runs started in the same second
            path, k = os.path.join(runs_dir, f"{name}_{k}"), k + 1
        os.makedirs(path)
    return distributed.broadcast_object(path)


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
    if not distributed.is_main():
        return
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    if not os.path.isfile(path):
        raise SystemExit(f"checkpoint {path} not found; pass --checkpoint RUN_DIR/last.pt or --resume RUN_DIR")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise SystemExit(f"{path}: not a readable checkpoint ({first}); pass another one") from None
    if not isinstance(ckpt, dict) or "args" not in ckpt:
        raise SystemExit(f"{path}: not a checkpoint written by these scripts (no saved args)")
    return ckpt


class RunLogger:
    """runs/<name>/: TensorBoard scalars, metrics.jsonl (one line per epoch) and results.json at the end.
    Under torchrun only rank 0 writes (the others return the same results without writing)."""

    def __init__(self, run_dir, args, resume_epoch=None):
        self.run_dir, self.writes = run_dir, distributed.is_main()
        if not self.writes:
            return
        from torch.utils.tensorboard import SummaryWriter  # here: a wrong flag fails before this slow import

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
