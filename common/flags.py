"""The flags every script shares: run, optimisation, data and speed. Each script adds its own (the fusion head and
the method's flags, with their defaults and ranges) in its `parse_args`; `python <script> --help` lists them all.

A flag left at None takes its value from the script's per-dataset PRESETS table (`fill`). Ranges are declared on the
flags with the types `positive()`, `at_least(lo)` and `between(lo, hi)` (from common/cli.py, also the scripts'
types: `flags.at_least(0)`); `check` refuses the impossible combinations of the shared flags.
"""

import os
import sys

import torch

from common.audio import AUDIO_PIPELINES
from common.cli import Parser, at_least, between, positive
from common.data import DATASETS

__all__ = ["parser", "add_data_args", "add_speed_args", "fill", "check", "at_least", "between", "positive"]

# flags that say *how* to run, not *what* to train: on --resume / --eval-only these come from the command line,
# every other flag from the saved run
OPERATIONAL = {"resume", "stop_after_epochs", "eval_only", "checkpoint", "device", "num_workers", "data_root"}
OPERATIONAL |= {"no_progress", "runs_dir", "channels_last", "compile", "cudnn_benchmark", "pin_memory"}
OPERATIONAL |= {"persistent_workers", "recheck_clips"}


def parser(doc, script_file):
    """An argparse parser (one-line errors) holding the shared flags; the script adds its own."""
    p = Parser(description=doc)
    name = os.path.splitext(os.path.basename(script_file))[0]
    nonneg_int, steps = at_least(0, int), "0 = all"
    g = p.add_argument_group("run")
    g.add_argument("--exp-name", default=name, help="run folder <dataset>__<exp-name>__<seed>__<time>")
    g.add_argument("--seed", type=between(0, 2**32 - 1, int), default=0, help="seed of the experiment")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    g.add_argument("--runs-dir", default="runs", help="where run folders are written")
    g.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last.pt")
    g.add_argument("--stop-after-epochs", type=nonneg_int, default=0, help="exit after N epochs (then --resume)")
    g.add_argument("--eval-only", action="store_true", help="evaluate --checkpoint on the test split and exit")
    g.add_argument("--checkpoint", help="checkpoint for --eval-only (RUN_DIR/last.pt or best.pt)")
    g.add_argument("--save-best", action="store_true", help="also keep best.pt: the best test epoch's weights")
    g.add_argument("--no-save", action="store_true", help="write no checkpoint (the run cannot be resumed)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (none when stderr is not a terminal)")
    g.add_argument("--max-steps", type=nonneg_int, default=0, help=f"training steps per epoch ({steps}; smoke tests)")
    g.add_argument("--eval-max-steps", type=nonneg_int, default=0, help=f"test batches ({steps}: the full split)")

    g = p.add_argument_group("optimisation (None: the script's PRESETS value for the dataset)")
    g.add_argument("--epochs", type=positive(int), help="training epochs")
    g.add_argument("--batch-size", type=positive(int), help="mini-batch size (the global batch)")
    g.add_argument("--optimizer", choices=["sgd", "adamw"], help="SGD (momentum 0.9) or AdamW")
    g.add_argument("--lr", type=positive(), help="base learning rate")
    g.add_argument("--lr-milestones", type=nonneg_int, nargs="*", help="0-based epochs where the LR is x --lr-gamma")
    g.add_argument("--lr-gamma", type=positive(), default=0.1, help="LR factor at each milestone")
    g.add_argument("--weight-decay", type=at_least(0), help="weight decay (default 1e-4 SGD, 0.01 AdamW)")
    g.add_argument("--clip-grad", "--grad-clip", type=at_least(0), help="max global gradient norm (0 = none)")
    add_data_args(p)
    add_speed_args(p)
    return p


def add_data_args(p):
    """The data flags (defaults: the official per-dataset values of docs/data.md; the cache tool uses them too)."""
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="synthetic", choices=sorted(DATASETS), help="which dataset to train on")
    g.add_argument("--data-root", default="data", help="folder holding <dataset>/ (synthetic: written on first use)")
    g.add_argument("--n-frames", type=positive(int), help="frames per clip (default: 1 CREMA-D/synthetic, 3 KS/VGG)")
    g.add_argument("--frame-size", type=positive(int), help="frame side in pixels (default 224; synthetic 32)")
    g.add_argument("--frame-select", default="segment", choices=["segment", "first"], help="frame sampling rule")
    g.add_argument("--clip-consistent-aug", action="store_true", help="one crop/flip per clip instead of per frame")
    g.add_argument("--tpami-frames", action="store_true", help="T-PAMI frame transforms (crop scale 0.25-1)")
    g.add_argument("--audio-pipeline", choices=sorted(AUDIO_PIPELINES), help="audio recipe (default: the dataset's)")
    ks = ["stft16k", "pkl1004", "fbank", "aug35k"]
    g.add_argument("--ks-audio", dest="audio_pipeline", choices=ks, help="alias of --audio-pipeline")
    g.add_argument("--audio-seconds", type=positive(), help="audio window in seconds (e.g. 20: AUG's CREMA-D setup)")
    g.add_argument("--num-workers", type=at_least(0, int), help="loader workers (default: 0 synthetic, else 4)")
    g.add_argument("--cache", action="store_true", help="read what `python -m preprocess.cache` wrote")
    g.add_argument(
        "--cache-frame-side", type=at_least(0, int), default=256, help="cached frames' short side (0: as is)"
    )
    g.add_argument("--legacy-loader", action="store_true", help="the previous loader (docs/data.md)")
    g.add_argument("--recheck-clips", action="store_true", help="check every clip's files, rewrite the clip index")
    g.add_argument("--in-memory", action="store_true", help="random in-memory tensors: the model step alone")
    return p


def add_speed_args(p):
    """Flags for speed only: what is trained stays the same (up to bfloat16 rounding with --amp)."""
    g = p.add_argument_group("speed")
    g.add_argument("--amp", action="store_true", help="bfloat16 autocast of the training forward passes")
    g.add_argument("--channels-last", action="store_true", help="channels-last memory format for the encoders")
    g.add_argument("--compile", action="store_true", help="torch.compile the encoders' trunks (slow first steps)")
    g.add_argument("--cudnn-benchmark", action="store_true", help="the fastest, non-deterministic cuDNN kernels")
    g.add_argument("--pin-memory", default="auto", choices=["auto", "on", "off"], help="pinned batches (auto: CUDA)")
    g.add_argument("--persistent-workers", action="store_true", help="keep the workers (--resume no longer bitwise)")
    return p


def fill(args, preset):
    """Fill every flag left at None from `preset` (the script's row for the dataset), then check the shared flags."""
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.clip_grad is None:
        args.clip_grad = 0.0
    if args.weight_decay is None:
        args.weight_decay = 1e-4 if args.optimizer == "sgd" else 0.01
    args.no_progress = args.no_progress or not sys.stderr.isatty()  # a log file gets one line per epoch
    check(args)
    return args


def check(args):
    """The impossible combinations of the shared flags: a one-line exit naming them, before anything is loaded."""
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
        raise SystemExit(
            f"--in-memory supports the STFT audio pipelines, not {pipeline}; pass --audio-pipeline cremad or stft16k"
        )
    if args.persistent_workers and args.num_workers == 0:
        raise SystemExit("--persistent-workers keeps loader workers, but --num-workers is 0: drop one of them")
    if args.eval_only and args.resume:
        raise SystemExit("--eval-only evaluates --checkpoint, --resume continues training: pass one of them")
    if args.eval_only and not args.checkpoint:
        raise SystemExit("--eval-only needs --checkpoint RUN_DIR/last.pt (or best.pt)")
    if args.checkpoint and not args.eval_only:
        raise SystemExit("--checkpoint is read only with --eval-only; to continue a run use --resume RUN_DIR")
    if args.resume and not os.path.isdir(args.resume):
        raise SystemExit(f"--resume {args.resume}: run folder not found; pass a folder under --runs-dir")
    if args.resume and args.no_save:
        raise SystemExit("--resume continues from last.pt, which --no-save does not write: drop --no-save")
