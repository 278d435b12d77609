"""Run management shared by every script: the common flags, per-dataset presets, the optimizer, run folders,
--resume / --eval-only, per-step and per-epoch logging (TensorBoard, metrics.jsonl, results.json), best/last
checkpoints and --stop-after-epochs. Nothing here is method logic."""

import json
import os
import random
import sys
import time
import warnings

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter

from common import distributed
from common.audio import AUDIO_PIPELINES
from common.cli import Parser, check
from common.data import DATASETS, LoadFailedWarning, add_data_args, load_failure_counts, load_failures_since

# flags that describe *how* to run, not *what* to train: on --resume/--eval-only these come from the command line
OPERATIONAL_FLAGS = {"resume", "stop_after_epochs", "eval_only", "checkpoint", "device", "num_workers", "data_root",
                     "no_progress", "runs_dir", "channels_last", "compile", "cudnn_benchmark", "pin_memory",
                     "persistent_workers"}


def make_parser(doc, script_file):
    """The flags every script shares (run, optimisation, data, speed); each script adds its method's flags."""
    p = Parser(description=doc)  # one-line errors (common/cli.py)
    name = os.path.splitext(os.path.basename(script_file))[0]
    p.add_argument("--exp-name", default=name,
                   help="name of this experiment (run folder <dataset>__<name>__<seed>__<time>)")
    p.add_argument("--seed", type=int, default=0, help="seed of the experiment")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: per-dataset preset)")
    p.add_argument("--batch-size", type=int, default=None, help="mini-batch size (default: per-dataset preset)")
    p.add_argument("--optimizer", default=None, choices=["sgd", "adamw"],
                   help="SGD (momentum 0.9, wd 1e-4) or AdamW (wd 0.01)")
    p.add_argument("--lr", type=float, default=None, help="base learning rate (default: per-dataset preset)")
    p.add_argument("--lr-milestones", type=int, nargs="*", default=None,
                   help="0-based epochs where the LR is multiplied by --lr-gamma")
    p.add_argument("--lr-gamma", type=float, default=0.1, help="LR decay factor at each milestone")
    p.add_argument("--weight-decay", type=float, default=None, help="weight decay (default 1e-4 SGD, 0.01 AdamW)")
    p.add_argument("--clip-grad", "--grad-clip", type=float, default=None,
                   help="max global gradient norm (0 = no clipping; default: the preset, else 0)")
    p.add_argument("--fusion", default="concat", choices=["concat", "sum", "film", "gated"], help="fusion head")
    p.add_argument("--max-steps", type=int, default=0,
                   help="cap on training steps per epoch (0 = full epoch; for smoke tests)")
    p.add_argument("--eval-max-steps", type=int, default=0, help="cap on test batches (0 = the full test split)")
    p.add_argument("--runs-dir", default="runs", help="where run folders are written")
    p.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue the interrupted run in RUN_DIR from its last.pt")
    p.add_argument("--stop-after-epochs", type=int, default=0,
                   help="exit after this many epochs in this process (time-limited jobs)")
    p.add_argument("--eval-only", action="store_true", help="evaluate --checkpoint on the test split and exit")
    p.add_argument("--checkpoint", default=None, help="checkpoint for --eval-only")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    add_data_args(p)
    distributed.add_speed_args(p)
    return p


def apply_preset(args, presets):
    """Fill every flag left at None from the per-dataset preset table of the script."""
    for key, value in presets[args.dataset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if getattr(args, "clip_grad", 0) is None:
        args.clip_grad = 0.0
    check_args(args)
    return args


def check_args(args):
    """The valid ranges of the shared flags and their impossible combinations: a one-line exit naming the flag,
    before any data or model is touched (docs: README, "Errors and valid ranges")."""
    for name in ("epochs", "batch_size", "lr", "lr_gamma", "n_frames", "frame_size", "audio_seconds"):
        check(args, name, lambda x: x > 0, "positive")
    for name in ("lr_milestones", "weight_decay", "clip_grad", "max_steps", "eval_max_steps", "stop_after_epochs",
                 "num_workers", "cache_frame_side"):
        check(args, name, lambda x: x >= 0, ">= 0" + (" (0 = off)" if name == "clip_grad" else ""))
    check(args, "seed", lambda x: 0 <= x < 2**32, "in [0, 2**32)")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise SystemExit(f"--device {args.device}: not a torch device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available on this machine; use --device cpu")
    if args.in_memory and args.cache:
        raise SystemExit("--in-memory uses random tensors, --cache reads files: pass one of them")
    pipeline = args.audio_pipeline or DATASETS[args.dataset]["audio"]
    if args.in_memory and AUDIO_PIPELINES[pipeline].kind != "stft":
        raise SystemExit(f"--in-memory supports the STFT audio pipelines, not {pipeline}; pass --audio-pipeline "
                         "cremad or stft16k")
    if args.persistent_workers and args.num_workers == 0:
        raise SystemExit("--persistent-workers keeps loader workers, but --num-workers is 0: drop one of them")
    if args.eval_only and args.resume:
        raise SystemExit("--eval-only evaluates --checkpoint, --resume continues training: pass one of them")
    if args.eval_only and not args.checkpoint:
        raise SystemExit("--eval-only needs --checkpoint RUN_DIR/best.pt (or last.pt)")
    if args.checkpoint and not args.eval_only:
        raise SystemExit("--checkpoint is read only with --eval-only; to continue a run use --resume RUN_DIR")
    if args.resume and not os.path.isdir(args.resume):
        raise SystemExit(f"--resume {args.resume}: run folder not found; pass a folder under --runs-dir")


def setup(args, presets):
    """Presets, then on --resume / --eval-only the saved run's settings. Returns (args, checkpoint or None)."""
    args = apply_preset(args, presets)
    if not (args.resume or args.eval_only):
        return args, None
    ckpt = load_checkpoint(os.path.join(args.resume, "last.pt") if args.resume else args.checkpoint)
    return merge_saved_args(args, ckpt["args"]), ckpt


def make_optimizer(args, params):
    """SGD with momentum 0.9 and weight decay 1e-4, or AdamW with weight decay 0.01 (--weight-decay overrides)."""
    if args.optimizer == "sgd":
        wd = 1e-4 if args.weight_decay is None else args.weight_decay
        return torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=wd)
    wd = 0.01 if args.weight_decay is None else args.weight_decay
    return torch.optim.AdamW(params, lr=args.lr, weight_decay=wd)


def evaluate_checkpoint(args, ckpt, model, evaluate_fn):
    """--eval-only: load the checkpoint's weights into `model`, print `evaluate_fn()`'s metrics and exit."""
    model.load_state_dict(ckpt["model"])
    model.eval()
    metrics = evaluate_fn()
    print(f"{args.checkpoint} (epoch {ckpt['epoch']}): {format_metrics(metrics)}")
    raise SystemExit(0)


class Run:
    """One training run: its folder, logs and checkpoints.

    Created after the model, optimizer and scheduler: with --resume it loads their state and the RNG state from
    RUN_DIR/last.pt (the script restores its method's extra state itself) and continues at `start_epoch`.
    Per epoch: `begin_epoch()`, `log_step(stats, n)` after every step, `train_metrics(optimizer)` after the loop,
    `end_epoch(epoch, metrics, state)` after evaluation; `finish()` after the last epoch.
    best.pt: the epoch with the highest test/acc (only epochs > select_after; ties_to_later: ties go to the later).
    """

    def __init__(self, args, ckpt, model, optimizer, scheduler, select_after=-1, ties_to_later=False):
        self.args, self.model, self.select_after, self.ties_to_later = args, model, select_after, ties_to_later
        self.script = os.path.splitext(os.path.basename(sys.argv[0]))[0]
        self.start_epoch, self.history, self.best, self.elapsed = 0, [], None, 0.0
        self.epochs_this_process = 0
        if args.resume:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            self.start_epoch, self.history, self.best = ckpt["epoch"] + 1, ckpt["history"], ckpt["best"]
            self.elapsed = ckpt["elapsed"]
            restore_rng(ckpt["rng"])
            self.dir = args.resume
            print(f"resuming {self.dir} at epoch {self.start_epoch}")
        else:
            self.dir = make_run_dir(args.runs_dir, run_name(args))
        self.logger = RunLogger(self.dir, args, resume_epoch=self.start_epoch - 1 if args.resume else None)
        print(f"run folder: {self.dir}")

    def begin_epoch(self):
        self.t0, self.sums, self.n_steps, self.n_samples = time.time(), {}, 0, 0
        self.load_failures = load_failure_counts()  # data/replaced_clips: the clips that fail to load from here

    def log_step(self, stats, n_samples):
        """Add one step's logged values (averaged over the epoch's steps) and its batch size (throughput)."""
        distributed.trace_step(self.model, stats)  # only with $BML_TRACE_DIR set (tests, benchmark)
        for k, val in stats.items():
            self.sums[k] = self.sums.get(k, 0.0) + val
        self.n_steps, self.n_samples = self.n_steps + 1, self.n_samples + n_samples

    def train_metrics(self, optimizer):
        """The epoch's mean train/* values. Call after the step loop, before scheduler.step(). Under torchrun the
        values are averaged over processes and every process gets rank 0's BatchNorm statistics."""
        sums, self.n_samples = distributed.finish_epoch(self.model, self.sums, self.n_samples)
        self.lr, self.train_time = optimizer.param_groups[0]["lr"], time.time() - self.t0
        return {k: v / max(1, self.n_steps) for k, v in sums.items()}

    def end_epoch(self, epoch, metrics, state, best_state=None):
        """Log the epoch, save last.pt (`state` plus the run's bookkeeping) and best.pt (`best_state`, default
        `state`) atomically, print, and exit after --stop-after-epochs epochs of this process."""
        metrics.update({"charts/lr": self.lr, "charts/samples_per_sec": self.n_samples / max(self.train_time, 1e-9),
                        "charts/epoch_time": time.time() - self.t0})
        # clips that failed to load in this epoch's training and evaluation, each replaced by the next clip (summed
        # over processes; DataLoader workers count into shared memory)
        replaced, ids = load_failures_since(self.load_failures)
        metrics["data/replaced_clips"] = int(distributed.all_reduce_sum([float(replaced)])[0])
        if metrics["data/replaced_clips"] and distributed.is_main():
            warnings.warn(f"epoch {epoch}: replaced {metrics['data/replaced_clips']} clips that failed to load by the "
                          f"next clip (first: {', '.join(ids[:3])}); fix or remove their files", LoadFailedWarning,
                          stacklevel=2)
        self.history.append({"epoch": epoch, **metrics})
        self.logger.log_epoch(epoch, metrics)
        acc, best_acc = metrics["test/acc"], None if self.best is None else self.best["test/acc"]
        is_best = epoch > self.select_after and (best_acc is None or acc > best_acc
                                                 or (self.ties_to_later and acc == best_acc))
        self.best = {"epoch": epoch, **metrics} if is_best else self.best
        self.elapsed += time.time() - self.t0
        run_state = {"epoch": epoch, "history": self.history, "best": self.best, "elapsed": self.elapsed,
                     "rng": capture_rng(), "args": vars(self.args)}
        if is_best:
            save_checkpoint(os.path.join(self.dir, "best.pt"), {**(best_state or state), **run_state})
        save_checkpoint(os.path.join(self.dir, "last.pt"), {**state, **run_state})
        print(f"epoch {epoch}: {format_metrics(metrics)} ({metrics['charts/epoch_time']:.1f}s)")
        self.epochs_this_process += 1
        stop = self.args.stop_after_epochs
        if stop and self.epochs_this_process >= stop and epoch + 1 < self.args.epochs:
            print(f"stopping after {self.epochs_this_process} epochs; continue with --resume {self.dir}")
            raise SystemExit(0)

    def finish(self):
        results = self.logger.finish(self.args, self.script, self.history, self.best, self.elapsed)
        print(f"best epoch {self.best['epoch']}: {format_metrics(self.best)}")
        print(f"last epoch: {format_metrics(results['last'])}")
        print(f"results: {os.path.join(self.dir, 'results.json')}")
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
        raise SystemExit(f"checkpoint {path} not found; pass --checkpoint PATH/best.pt or --resume RUN_DIR")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise SystemExit(f"{path}: not a readable checkpoint ({first}); pass another one") from None
    if not isinstance(ckpt, dict) or "args" not in ckpt:
        raise SystemExit(f"{path}: not a checkpoint written by these scripts (no saved args)")
    return ckpt


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
        self.run_dir, self.writes = run_dir, distributed.is_main()
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
