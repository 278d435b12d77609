# docs and experiment results: docs/opm.md
"""OPM, On-the-fly Prediction Modulation (Wei, Hu, Du, Wen, T-PAMI 2024; spec: ../shared/reference/opm.md).

Joint training, plus: after the warm-up, the dominant modality (higher summed true-class probability of the
half-bias unimodal logits) gets a drop probability q = q_base (1 + lam tanh(rho - 1)); on a random p_exe share of
steps its pooled feature vector is zeroed per sample with probability q, both modalities' features are rescaled by
1 / (1 - mean(q)), and samples that lost every modality are removed. Nothing is dropped at evaluation.
"""

import argparse
import math
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
# ALGO LOGIC: opm.md section 4. KS [code]: AdamW 5e-5, x0.1 after epochs 39 and 79. CREMA-D [suggested]: the authors'
# journal CREMA-D optimizer (x0.1 every 20 epochs). VGGSound [suggested]: as KS. synthetic: baseline.py's optimisation
# with the CREMA-D method values, warm-up scaled 6/100 -> 1 of 10 epochs.
PRESETS = {
    "cremad": dict(optimizer="adamw", lr=1e-3, lr_milestones=[20, 40, 60, 80], batch_size=32, epochs=100,
                   q_base=0.5, lam=0.5, p_exe=0.7, warmup_epochs=6),
    "ks": dict(optimizer="adamw", lr=5e-5, lr_milestones=[40, 80], batch_size=32, epochs=100,
               q_base=0.5, lam=0.5, p_exe=0.7, warmup_epochs=6),
    "vggsound": dict(optimizer="adamw", lr=5e-5, lr_milestones=[40, 80], batch_size=32, epochs=100,
                     q_base=0.5, lam=0.5, p_exe=0.7, warmup_epochs=6),
    "synthetic": dict(optimizer="sgd", lr=1e-2, lr_milestones=[8], batch_size=32, epochs=10,
                      q_base=0.5, lam=0.5, p_exe=0.7, warmup_epochs=1),
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
    p.add_argument("--q-base", type=float, default=None, help="base drop probability of the dominant modality (default: preset, 0.5)")
    p.add_argument("--lam", type=float, default=None, help="extra drop strength lambda: q = q_base (1 + lam tanh(rho - 1)) (default: preset)")
    p.add_argument("--p-exe", type=float, default=None, help="probability that a step drops at all (default: preset, 0.7)")
    p.add_argument("--warmup-epochs", type=int, default=None, help="epochs 0..N-1 are plain joint training (default: preset)")
    p.add_argument("--opm-window", type=int, nargs=2, default=None, metavar=("START", "END"),
                   help="drop only in epochs START..END inclusive (default: from the end of the warm-up to the last epoch)")
    p.add_argument("--rescale", default="mean", choices=["mean", "per-modality", "none"],
                   help="mean = both modalities / (1 - mean(q)) (release); per-modality = each / (1 - q_m) (extension)")
    p.add_argument("--unimodal-logits", default="split", choices=["split", "self-gate"],
                   help="split = slice the head (concat, sum); self-gate = gated head, each modality gates itself (extension)")
    add_data_args(p)
    distributed.add_speed_args(p)
    return p.parse_args(argv)


def make_optimizer(args, model):
    if args.optimizer == "sgd":
        wd = 1e-4 if args.weight_decay is None else args.weight_decay
        return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=wd)
    wd = 0.01 if args.weight_decay is None else args.weight_decay
    return torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=wd)


# ALGO LOGIC: scores, drop probabilities, masks and the feature drop of OPM
def check_fusion(fusion, unimodal):
    """OPM's scores need per-modality logits from the head: concat and sum split exactly; gated only with self-gate."""
    if fusion == "film" or (fusion == "gated" and unimodal != "self-gate"):
        raise SystemExit(f"--fusion {fusion}: the head cannot be split into unimodal logits for OPM's scores (models.md 7.4). "
                         "Use --fusion concat or sum, or --fusion gated --unimodal-logits self-gate.")


@torch.no_grad()
def scores(z_a, z_v, label):
    """s_m = sum over the batch of softmax(z_m)[y], from the half-bias unimodal logits, without gradient.
    Under torchrun the sums run over the global batch (all processes), so every process gets the same q."""
    s_a = torch.softmax(z_a, 1).gather(1, label[:, None]).sum()
    s_v = torch.softmax(z_v, 1).gather(1, label[:, None]).sum()
    s_a, s_v = distributed.all_reduce_sum(torch.stack([s_a, s_v]))
    return s_a, s_v


def drop_probabilities(s_a, s_v, q_base, lam):
    """(q_a, q_v): q_base (1 + lam tanh(relu(rho - 1))) for the dominant modality, 0 for the other (both 0 on a tie)."""
    r_a = math.tanh(max(s_a / s_v - 1.0, 0.0))
    r_v = math.tanh(max(s_v / s_a - 1.0, 0.0))
    q_a = q_base * (1.0 + lam * r_a) if r_a > 0 else 0.0
    q_v = q_base * (1.0 + lam * r_v) if r_v > 0 else 0.0
    return min(max(q_a, 0.0), 1.0), min(max(q_v, 0.0), 1.0)


def execute_drop(p_exe, generator):
    """u ~ U(0, 1); the drop is executed this step if u >= 1 - p_exe, i.e. with probability p_exe."""
    return torch.rand((), generator=generator).item() >= 1 - p_exe


def feature_masks(q_a, q_v, batch_size, generator):
    """keep_m ~ Bernoulli(1 - q_m), one draw per sample and modality (a dropped sample loses its whole vector)."""
    keep_a = torch.bernoulli(torch.full((batch_size,), 1.0 - q_a), generator=generator)
    keep_v = torch.bernoulli(torch.full((batch_size,), 1.0 - q_v), generator=generator)
    return keep_a, keep_v


def rescale_factors(q_a, q_v, rescale="mean"):
    """mean: 1 / (1 - theta) for both, theta = (q_a + q_v) / 2 (d_a = d_v = 512); per-modality: 1 / (1 - q_m); none: 1."""
    if rescale == "mean":
        theta = (q_a + q_v) / 2
        return (1.0 / (1.0 - theta),) * 2 if theta < 1 else (0.0, 0.0)  # theta = 1: every row is dropped anyway
    if rescale == "per-modality":
        return tuple(1.0 / (1.0 - q) if q < 1 else 0.0 for q in (q_a, q_v))
    return 1.0, 1.0


def drop_features(a, v, label, keep_a, keep_v, q_a, q_v, rescale="mean"):
    """a~ = keep_a a / (1 - theta), v~ likewise (plain products, so autograd scales the gradient the same way);
    then keep only the samples with at least one modality left. Returns the kept (a~, v~, label)."""
    f_a, f_v = rescale_factors(q_a, q_v, rescale)
    a = a * (keep_a[:, None] * f_a)
    v = v * (keep_v[:, None] * f_v)
    keep = (keep_a + keep_v) > 0
    return a[keep], v[keep], label[keep]


if __name__ == "__main__":
    args = apply_preset(parse_args(), PRESETS)
    ckpt = None
    if args.resume or args.eval_only:
        ckpt = load_checkpoint(os.path.join(args.resume, "last.pt") if args.resume else args.checkpoint)
        args = merge_saved_args(args, ckpt["args"])
    script = os.path.basename(__file__)[: -len(".py")]
    check_fusion(args.fusion, args.unimodal_logits)  # ALGO LOGIC: film/gated have no unimodal split

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
    opm_gen = torch.Generator()  # ALGO LOGIC: OPM's draws have a stream of their own (CPU, so any device draws
    opm_gen.manual_seed(args.seed + 1_000_000)  # the same masks); data order and augmentation are unchanged by it

    def logits_fn(audio, visual):
        f_a, f_v, z = model.head(model.audio_net(audio), model.visual_net(visual))  # ALGO LOGIC: no drop at evaluation
        z_a, z_v = unimodal_logits(model.head, f_a, f_v, bias="half")
        return z, z_a, z_v

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
        opm_gen.set_state(ckpt["opm_rng"])  # ALGO LOGIC
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
        # ALGO LOGIC: OPM acts after the warm-up, to the last epoch (or inside --opm-window)
        opm_on = epoch >= args.warmup_epochs and (args.opm_window is None or args.opm_window[0] <= epoch <= args.opm_window[1])
        rescale_sum, n_exec = 0.0, 0
        bar = tqdm(train_loader, desc=f"epoch {epoch}", leave=False, disable=args.no_progress)
        for step, (spec, frames, label) in enumerate(bar):
            if args.max_steps and step >= args.max_steps:
                break
            audio, visual, label = spec.unsqueeze(1).to(device), frames.to(device), label.to(device)

            a, v = train_model(lambda m: (m.audio_net(audio), m.visual_net(visual)))  # through DDP, as the head below
            with torch.no_grad():  # ALGO LOGIC: scores from the full batch before any drop (losses: monitoring only)
                z_a, z_v = unimodal_logits(model.head, *model.head(a, v)[:2], bias="half")
                loss_a, loss_v = F.cross_entropy(z_a, label), F.cross_entropy(z_v, label)
                s_a, s_v = scores(z_a, z_v, label)
            # ALGO LOGIC: drop probabilities; execute with probability p_exe; mask, rescale, remove empty samples
            q_a, q_v, executed, y, dropped = 0.0, 0.0, False, label, (0.0, 0.0)
            if opm_on:
                q_a, q_v = drop_probabilities(s_a.item(), s_v.item(), args.q_base, args.lam)
                executed = execute_drop(args.p_exe, opm_gen)
                if executed:
                    # torchrun: the same draws in every process, for the global batch; each process keeps its rows
                    keep_a, keep_v = feature_masks(q_a, q_v, label.shape[0] * distributed.world_size(), opm_gen)
                    keep_a, keep_v = distributed.local_rows(keep_a), distributed.local_rows(keep_v)
                    a, v, y = drop_features(a, v, label, keep_a.to(device), keep_v.to(device), q_a, q_v, args.rescale)
                    dropped = (1 - keep_a.mean().item(), 1 - keep_v.mean().item())
                    rescale_sum, n_exec = rescale_sum + max(rescale_factors(q_a, q_v, args.rescale)), n_exec + 1
                    if y.shape[0] == 0:  # every sample lost both modalities: skip the step (never with two modalities)
                        continue
            f_a, f_v, z = train_model(lambda m: m.head(a, v))
            loss = F.cross_entropy(z, y)  # mean over the kept samples; only the fused loss is back-propagated

            optimizer.zero_grad()
            loss.backward()
            if args.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            optimizer.step()

            stats = {"train/loss": loss.item(), "train/loss_audio": loss_a.item(), "train/loss_visual": loss_v.item(),
                     "train/ratio": (s_a / s_v).item(), "train/coeff_audio": q_a, "train/coeff_visual": q_v,
                     "train/drop_exec_frac": float(executed), "train/drop_frac_audio": dropped[0],  # ALGO LOGIC: OPM's
                     "train/drop_frac_visual": dropped[1]}  # drop probabilities and what was dropped
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
        metrics["train/rescale"] = rescale_sum / n_exec if n_exec else 1.0  # ALGO LOGIC: mean factor on executed steps
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
                 "args": vars(args), "class_names": class_names, "opm_rng": opm_gen.get_state()}
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
