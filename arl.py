# docs and experiment results: docs/arl.md
"""ARL, Asymmetric Representation Learning (Wei, Luo, Luo, ICCV 2025; spec: ../shared/reference/arl.md).

Joint training plus (1) the unimodal cross-entropies of the zero-fill logits read out of the shared head,
weighted by gamma after the warm-up, and (2) a GradScale on each encoder output that multiplies the gradient
entering encoder m by 1 + c_m, where c = softmax(T * [d_v w_a, d_a w_v]) pushes the dependence share d_a
(mean |logit|) toward the inverse-variance share w_a (inverse mean entropy). `diff baseline.py arl.py` shows it.
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
# ALGO LOGIC: ARL's launch scripts (arl.md section 4): LR 1e-3 for epochs 0-68, 1e-4 from 69; gamma, T, warm-up 0-5,
# clip 40. synthetic: baseline.py's optimisation with the CREMA-D method values, warm-up scaled 6/100 -> 1 of 10 epochs.
PRESETS = {
    "cremad": dict(optimizer="sgd", lr=1e-3, lr_milestones=[69], batch_size=64, epochs=100, clip_grad=40.0,
                   gamma=4.0, temperature=8.0, warmup_epochs=6),
    "ks": dict(optimizer="sgd", lr=1e-3, lr_milestones=[69], batch_size=64, epochs=100, clip_grad=40.0,
               gamma=3.0, temperature=4.0, warmup_epochs=6),
    "vggsound": dict(optimizer="sgd", lr=1e-3, lr_milestones=[69], batch_size=64, epochs=100, clip_grad=40.0,
                     gamma=4.0, temperature=4.0, warmup_epochs=6),
    "synthetic": dict(optimizer="sgd", lr=1e-2, lr_milestones=[8], batch_size=32, epochs=10, clip_grad=40.0,
                      gamma=4.0, temperature=8.0, warmup_epochs=1),
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
    p.add_argument("--clip-grad", "--grad-clip", type=float, default=None, help="max global gradient norm (0 = no clipping; default: preset, 40)")
    p.add_argument("--fusion", default="concat", choices=["concat", "sum", "gated"], help="fusion head (FiLM has no unimodal logits)")
    p.add_argument("--max-steps", type=int, default=0, help="cap on training steps per epoch (0 = full epoch; for smoke tests)")
    p.add_argument("--eval-max-steps", type=int, default=0, help="cap on test batches (0 = the full test split)")
    p.add_argument("--runs-dir", default="runs", help="where run folders are written")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue the interrupted run in RUN_DIR from its last.pt")
    p.add_argument("--stop-after-epochs", type=int, default=0, help="exit after this many epochs in this process (time-limited jobs)")
    p.add_argument("--eval-only", action="store_true", help="evaluate --checkpoint on the test split and exit")
    p.add_argument("--checkpoint", default=None, help="checkpoint for --eval-only")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    # Algorithm specific arguments
    p.add_argument("--gamma", type=float, default=None, help="weight of the unimodal losses after the warm-up (default: preset)")
    p.add_argument("--temperature", "--T", type=float, default=None, help="softmax temperature T of the coefficients (default: preset)")
    p.add_argument("--warmup-epochs", type=int, default=None, help="epochs 0..N-1 train L_f + L_a + L_v unscaled (default: preset)")
    p.add_argument("--entropy-floor", type=float, default=0.3, help="floor on the normalised entropy shares h_a, h_v")
    p.add_argument("--arl-weights", default="computed", choices=["computed", "fixed"],
                   help="computed = the paper; fixed = the release (coefficients stay 0.5: both encoders x1.5)")
    p.add_argument("--arl-coeff-timing", default="previous", choices=["previous", "current"],
                   help="multiplier of step t from the coefficients of step t-1 (previous) or of the same batch (current)")
    p.add_argument("--select-after", type=int, default=-1, help="best-epoch selection only over epochs > N (the release: 30)")
    add_data_args(p)
    distributed.add_speed_args(p)
    return p.parse_args(argv)


def make_optimizer(args, model):
    if args.optimizer == "sgd":
        wd = 1e-4 if args.weight_decay is None else args.weight_decay
        return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=wd)
    wd = 0.01 if args.weight_decay is None else args.weight_decay
    return torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=wd)


# ALGO LOGIC: GradScale, the coefficients, the forward pass and the loss of ARL
class GradScale(torch.autograd.Function):
    """Identity in the forward pass; multiplies the gradient by (1 + w) in the backward pass (w a constant)."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.scale = 1.0 + float(w)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None  # no gradient for w


def arl_coefficients(z_a, z_v, temperature, entropy_floor=0.3):
    """ARL's statistics of one batch of (detached) zero-fill unimodal logits (arl.md 2.2).

    d_a: dependence share, from the mean absolute logit; w_a: inverse-variance share, from the mean entropy
    (floored at `entropy_floor`); c = softmax(T [d_v w_a, d_a w_v]) = (sigmoid(T (w_a - d_a)), 1 - c_a).
    Under torchrun the means are over the global batch: per-class |logit| sums, entropy sums and the sample count
    are summed over all processes first, then divided.
    """
    p_a, p_v = torch.softmax(z_a, 1), torch.softmax(z_v, 1)
    c = z_a.shape[1]
    sums = distributed.all_reduce_sum(torch.cat([
        z_a.abs().sum(0), z_v.abs().sum(0), -(p_a * torch.log(p_a + 1e-16)).sum(1).sum()[None],
        -(p_v * torch.log(p_v + 1e-16)).sum(1).sum()[None], z_a.new_tensor([z_a.shape[0]])]))
    n = sums[-1]
    dep_a, dep_v = (sums[:c] / n).sum(), (sums[c:2 * c] / n).sum()
    d_a = dep_a / (dep_a + dep_v) if dep_a + dep_v >= 1e-12 else z_a.new_tensor(0.5)  # guard: all-zero logits
    d_v = 1 - d_a
    ent_a, ent_v = sums[2 * c] / n, sums[2 * c + 1] / n
    if ent_a + ent_v >= 1e-12:
        h_a = torch.clamp(ent_a / (ent_a + ent_v), min=entropy_floor)
        h_v = torch.clamp(ent_v / (ent_a + ent_v), min=entropy_floor)
    else:  # guard: both predictions one-hot
        h_a = h_v = z_a.new_tensor(0.5)
    w_a = (1 / h_a) / (1 / h_a + 1 / h_v)
    w_v = 1 - w_a
    c = torch.softmax(temperature * torch.stack([d_v * w_a, d_a * w_v]), 0)
    return {"c_a": c[0], "c_v": c[1], "d_a": d_a, "d_v": d_v, "w_a": w_a, "w_v": w_v, "entropy_a": ent_a, "entropy_v": ent_v}


def arl_forward(model, audio, visual, coeff):
    """Encoders, GradScale by 1 + c_m on each encoder output (c = 0: unscaled), head, zero-fill unimodal logits."""
    a, v = model.audio_net(audio), model.visual_net(visual)
    a, v = GradScale.apply(a, coeff[0]), GradScale.apply(v, coeff[1])
    f_a, f_v, z = model.head(a, v)
    z_a, z_v = unimodal_logits(model.head, f_a, f_v, bias="full")
    return a, v, z, z_a, z_v


def arl_loss(z, z_a, z_v, label, weight):
    """L = CE(z) + weight (CE(z_a) + CE(z_v)); weight is gamma after the warm-up and 1 during it."""
    loss_f, loss_a, loss_v = F.cross_entropy(z, label), F.cross_entropy(z_a, label), F.cross_entropy(z_v, label)
    return loss_f + weight * (loss_a + loss_v), loss_f, loss_a, loss_v


if __name__ == "__main__":
    args = apply_preset(parse_args(), PRESETS)
    ckpt = None
    if args.resume or args.eval_only:
        ckpt = load_checkpoint(os.path.join(args.resume, "last.pt") if args.resume else args.checkpoint)
        args = merge_saved_args(args, ckpt["args"])
    script = os.path.basename(__file__)[: -len(".py")]
    if args.select_after >= args.epochs - 1:
        raise SystemExit(f"--select-after {args.select_after} leaves no epoch to select among {args.epochs}")

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
    train_model = distributed.wrap(model, args)  # DDP under torchrun; --amp

    def logits_fn(audio, visual):
        f_a, f_v, z = model.head(model.audio_net(audio), model.visual_net(visual))
        z_a, z_v = unimodal_logits(model.head, f_a, f_v, bias="full")  # ALGO LOGIC: zero-fill, full bias
        return z, z_a, z_v

    if args.eval_only:
        model.load_state_dict(ckpt["model"])
        model.eval()
        metrics = evaluate(logits_fn, test_loader, device, num_classes, args.eval_max_steps)
        print(f"{args.checkpoint} (epoch {ckpt['epoch']}): {format_metrics(metrics)}")
        raise SystemExit(0)

    start_epoch, history, best, elapsed = 0, [], None, 0.0
    coeff = (0.5, 0.5)  # ALGO LOGIC: ARL's state (c_a, c_v), carried across steps and epochs
    if args.resume:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_epoch, history, best, elapsed = ckpt["epoch"] + 1, ckpt["history"], ckpt["best"], ckpt["elapsed"]
        restore_rng(ckpt["rng"])
        coeff = tuple(ckpt["arl_coeff"])
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

            # ALGO LOGIC: GradScale (after the warm-up), gamma-weighted unimodal losses, coefficients for the next step
            arl_on = epoch >= args.warmup_epochs
            applied = coeff if arl_on and args.arl_coeff_timing == "previous" else (0.0, 0.0)  # c of the previous step
            a, v, z, z_a, z_v = train_model(arl_forward, audio, visual, applied)  # = arl_forward(model, ...), through DDP
            loss, loss_f, loss_a, loss_v = arl_loss(z, z_a, z_v, label, args.gamma if arl_on else 1.0)
            arl = arl_coefficients(z_a.detach(), z_v.detach(), args.temperature, args.entropy_floor)
            if arl_on and args.arl_weights == "computed":
                coeff = (arl["c_a"].item(), arl["c_v"].item())
            if arl_on and args.arl_coeff_timing == "current":  # the same batch's coefficients, as gradient hooks
                applied = coeff
                a.register_hook(lambda g, s=1.0 + applied[0]: g * s)
                v.register_hook(lambda g, s=1.0 + applied[1]: g * s)

            optimizer.zero_grad()
            loss.backward()
            if args.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            optimizer.step()

            stats = {"train/loss": loss.item(), "train/loss_audio": loss_a.item(), "train/loss_visual": loss_v.item(),
                     "train/ratio": (arl["d_a"] / arl["d_v"]).item(), "train/coeff_audio": 1.0 + applied[0],
                     "train/coeff_visual": 1.0 + applied[1], "train/loss_fused": loss_f.item(),  # ALGO LOGIC: ARL's extras
                     "train/dep_audio": arl["d_a"].item(), "train/var_share_audio": arl["w_a"].item(),
                     "train/target_ratio": (arl["w_a"] / arl["w_v"]).item(), "train/entropy_audio": arl["entropy_a"].item(),
                     "train/entropy_visual": arl["entropy_v"].item()}
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
        is_best = epoch > args.select_after and (best is None or metrics["test/acc"] > best["test/acc"])
        best = {"epoch": epoch, **metrics} if is_best else best
        elapsed += time.time() - t0
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "epoch": epoch, "history": history, "best": best, "elapsed": elapsed, "rng": capture_rng(),
                 "args": vars(args), "class_names": class_names, "arl_coeff": coeff}
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
