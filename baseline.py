# docs and experiment results: docs/baseline.md
"""Joint training: two ResNet18 encoders and a fusion head trained by the fused cross-entropy alone.

The "naive" row of every paper, and the file every method script is read against (`diff baseline.py ogm.py`).
`--modality audio|visual` trains a unimodal model (the papers' audio-only and visual-only rows).
"""

import argparse
import os
import random
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import distributed
from common.data import DATASETS, add_data_args, build_datasets, make_loaders
from common.evaluate import evaluate
from common.models import AVClassifier, unimodal_logits
from common.utils import (RunLogger, apply_preset, capture_rng, format_metrics, load_checkpoint, make_run_dir,
                          merge_saved_args, restore_rng, run_name, save_checkpoint)

# official optimisation settings per dataset (None in a flag = take it from here); milestones are the 0-based
# epochs at which the effective LR is multiplied by lr_gamma (README of ../shared/reference, "Official defaults")
PRESETS = {
    "cremad": dict(optimizer="sgd", lr=1e-3, lr_milestones=[70], batch_size=64, epochs=100),
    "ks": dict(optimizer="sgd", lr=1e-3, lr_milestones=[70], batch_size=64, epochs=100),
    "vggsound": dict(optimizer="sgd", lr=1e-3, lr_milestones=[70], batch_size=64, epochs=100),
    "synthetic": dict(optimizer="sgd", lr=1e-2, lr_milestones=[8], batch_size=32, epochs=10),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--exp-name", default=os.path.basename(__file__)[: -len(".py")], help="name of this experiment")
    p.add_argument("--seed", type=int, default=0, help="seed of the experiment")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: per-dataset preset)")
    p.add_argument("--batch-size", type=int, default=None, help="mini-batch size (default: per-dataset preset)")
    p.add_argument("--optimizer", default=None, choices=["sgd", "adamw"], help="SGD (momentum 0.9, wd 1e-4) or AdamW (wd 0.01)")
    p.add_argument("--lr", type=float, default=None, help="base learning rate (default: per-dataset preset)")
    p.add_argument("--lr-milestones", type=int, nargs="*", default=None, help="0-based epochs where the LR is multiplied by --lr-gamma")
    p.add_argument("--lr-gamma", type=float, default=0.1, help="LR decay factor at each milestone")
    p.add_argument("--weight-decay", type=float, default=None, help="weight decay (default 1e-4 SGD, 0.01 AdamW)")
    p.add_argument("--clip-grad", type=float, default=0.0, help="max gradient norm (0 = no clipping)")
    p.add_argument("--fusion", default="concat", choices=["concat", "sum", "film", "gated"], help="fusion head")
    p.add_argument("--max-steps", type=int, default=0, help="cap on training steps per epoch (0 = full epoch; for smoke tests)")
    p.add_argument("--eval-max-steps", type=int, default=0, help="cap on test batches (0 = the full test split)")
    p.add_argument("--runs-dir", default="runs", help="where run folders are written")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue the interrupted run in RUN_DIR from its last.pt")
    p.add_argument("--stop-after-epochs", type=int, default=0, help="exit after this many epochs in this process (time-limited jobs)")
    p.add_argument("--eval-only", action="store_true", help="evaluate --checkpoint on the test split and exit")
    p.add_argument("--checkpoint", default=None, help="checkpoint for --eval-only")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    # Algorithm specific arguments
    p.add_argument("--modality", default="both", choices=["both", "audio", "visual"], help="both = joint training; audio/visual = unimodal baseline")
    add_data_args(p)
    distributed.add_speed_args(p)
    return p.parse_args(argv)


def make_optimizer(args, model):
    if args.optimizer == "sgd":
        wd = 1e-4 if args.weight_decay is None else args.weight_decay
        return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=wd)
    wd = 0.01 if args.weight_decay is None else args.weight_decay
    return torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=wd)


def forward(model, audio, visual, modality):
    """Encoders then head; a unimodal baseline feeds zeros for the missing modality's feature."""
    a = model.audio_net(audio) if modality != "visual" else None
    v = model.visual_net(visual) if modality != "audio" else None
    a = torch.zeros_like(v) if a is None else a
    v = torch.zeros_like(a) if v is None else v
    return model.head(a, v)


if __name__ == "__main__":
    args = apply_preset(parse_args(), PRESETS)
    ckpt = None
    if args.resume or args.eval_only:
        ckpt = load_checkpoint(os.path.join(args.resume, "last.pt") if args.resume else args.checkpoint)
        args = merge_saved_args(args, ckpt["args"])
    script = os.path.basename(__file__)[: -len(".py")]
    distributed.init(args)  # torchrun: join the process group (no-op in a single process)

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    device = torch.device(args.device)

    # TRY NOT TO MODIFY: data, model, optimizer
    train_set, test_set, class_names = build_datasets(args)
    num_classes = len(class_names)
    args.num_workers = (0 if args.dataset == "synthetic" else 4) if args.num_workers is None else args.num_workers
    loader_gen = torch.Generator()
    train_loader, test_loader = make_loaders(train_set, test_set, args.batch_size, args.num_workers, loader_gen,
                                             args.pin_memory, args.persistent_workers)
    model = AVClassifier(num_classes, args.fusion).to(device)
    optimizer = make_optimizer(args, model)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, args.lr_milestones, args.lr_gamma)
    train_model = distributed.wrap(model, args, find_unused=args.modality != "both")  # DDP under torchrun; --amp

    def logits_fn(audio, visual):
        f_a, f_v, z = forward(model, audio, visual, args.modality)
        if args.fusion == "film":  # FiLM has no unimodal logits (models.md 7.4): fused metrics only
            return z, None, None
        z_a, z_v = unimodal_logits(model.head, f_a, f_v, bias="half")
        return z, (z_a if args.modality != "visual" else None), (z_v if args.modality != "audio" else None)

    if args.eval_only:
        model.load_state_dict(ckpt["model"])
        model.eval()
        metrics = evaluate(logits_fn, test_loader, device, num_classes, args.eval_max_steps)
        print(f"{args.checkpoint} (epoch {ckpt['epoch']}): {format_metrics(metrics)}")
        raise SystemExit(0)

    start_epoch, history, best, elapsed = 0, [], None, 0.0
    if args.resume:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_epoch, history, best, elapsed = ckpt["epoch"] + 1, ckpt["history"], ckpt["best"], ckpt["elapsed"]
        restore_rng(ckpt["rng"])
        run_dir = args.resume
        print(f"resuming {run_dir} at epoch {start_epoch}")
    else:
        run_dir = make_run_dir(args.runs_dir, run_name(args, script))
    logger = RunLogger(run_dir, args, resume_epoch=start_epoch - 1 if args.resume else None)
    print(f"run folder: {run_dir}")

    epochs_this_process = 0
    for epoch in range(start_epoch, args.epochs):
        t0 = time.time()
        model.train()
        loader_gen.manual_seed(args.seed * 100_003 + epoch)  # shuffling and augmentation depend only on (seed, epoch)
        distributed.set_epoch(train_loader)  # torchrun: this process's shard and augmentation stream
        sums, n_steps, n_samples = {}, 0, 0
        bar = tqdm(train_loader, desc=f"epoch {epoch}", leave=False, disable=args.no_progress)
        for step, (spec, frames, label) in enumerate(bar):
            if args.max_steps and step >= args.max_steps:
                break
            audio, visual, label = spec.unsqueeze(1).to(device), frames.to(device), label.to(device)

            f_a, f_v, z = train_model(forward, audio, visual, args.modality)  # = forward(model, ...), through DDP
            loss = F.cross_entropy(z, label)
            with torch.no_grad():  # monitoring only: unimodal losses and the score ratio s_a / s_v
                z_a, z_v = unimodal_logits(model.head, f_a, f_v, bias="half") if args.fusion != "film" else (z, z)
                loss_a, loss_v = F.cross_entropy(z_a, label), F.cross_entropy(z_v, label)
                s_a = torch.softmax(z_a, 1).gather(1, label[:, None]).sum()
                s_v = torch.softmax(z_v, 1).gather(1, label[:, None]).sum()

            optimizer.zero_grad()
            loss.backward()
            if args.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            optimizer.step()

            stats = {"train/loss": loss.item(), "train/loss_audio": loss_a.item(), "train/loss_visual": loss_v.item(),
                     "train/ratio": (s_a / s_v).item(), "train/coeff_audio": 1.0, "train/coeff_visual": 1.0}
            distributed.trace_step(model, stats)  # no-op unless $BML_TRACE_DIR is set (tests, benchmark)
            for k, val in stats.items():
                sums[k] = sums.get(k, 0.0) + val
            n_steps, n_samples = n_steps + 1, n_samples + label.shape[0]
            bar.set_postfix(loss=f"{loss.item():.3f}")
        sums, n_samples = distributed.finish_epoch(model, sums, n_samples)  # torchrun: rank 0's BN buffers, global stats
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        train_time = time.time() - t0

        # TRY NOT TO MODIFY: evaluation, logging, checkpoints
        model.eval()
        metrics = {k: v / max(1, n_steps) for k, v in sums.items()}
        metrics.update(evaluate(logits_fn, test_loader, device, num_classes, args.eval_max_steps))
        metrics.update({"charts/lr": lr, "charts/samples_per_sec": n_samples / max(train_time, 1e-9),
                        "charts/epoch_time": time.time() - t0})
        history.append({"epoch": epoch, **metrics})
        logger.log_epoch(epoch, metrics)
        is_best = best is None or metrics["test/acc"] > best["test/acc"]
        best = {"epoch": epoch, **metrics} if is_best else best
        elapsed += time.time() - t0
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "epoch": epoch, "history": history, "best": best, "elapsed": elapsed, "rng": capture_rng(),
                 "args": vars(args), "class_names": class_names}
        save_checkpoint(os.path.join(run_dir, "last.pt"), state)
        if is_best:
            save_checkpoint(os.path.join(run_dir, "best.pt"), state)
        print(f"epoch {epoch}: {format_metrics(metrics)} ({metrics['charts/epoch_time']:.1f}s)")
        epochs_this_process += 1
        if args.stop_after_epochs and epochs_this_process >= args.stop_after_epochs and epoch + 1 < args.epochs:
            print(f"stopping after {epochs_this_process} epochs; continue with --resume {run_dir}")
            raise SystemExit(0)

    results = logger.finish(args, script, history, best, elapsed)
    print(f"best epoch {best['epoch']}: {format_metrics(best)}")
    print(f"last epoch: {format_metrics(results['last'])}")
    print(f"results: {os.path.join(run_dir, 'results.json')}")
