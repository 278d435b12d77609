# docs and experiment results: docs/ogm.md
"""OGM / OGM-GE, On-the-fly Gradient Modulation (Peng et al., CVPR 2022; Wei et al., T-PAMI 2024; spec: ../shared/reference/ogm.md).

Joint training, plus: at every step the dominance ratio of the two modalities' summed true-class probabilities
(half-bias unimodal logits of the fused head) gives the dominant modality a coefficient k = 1 - tanh(alpha * rho);
after backward its encoder's conv-kernel gradients are multiplied by k, and with GE (the default) both encoders'
conv gradients get Gaussian noise with the std of the unscaled gradient. `--preset tpami` gives the journal release.
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
# ALGO LOGIC: one table per --preset (ogm.md section 4). cvpr: the CVPR release (KS alpha 0.8 is [suggested]).
# tpami: the journal release (KS [code], CREMA-D [authors], VGGSound [suggested] = the KS row). synthetic: baseline.py's
# optimisation with the CREMA-D method values, epoch counts scaled 100 -> 10 (window 0-50 -> 0-5, 0-80 -> 0-8, warm-up 6 -> 1).
PRESETS = {
    "cvpr": {
        "cremad": dict(optimizer="sgd", lr=1e-3, lr_milestones=[70], batch_size=64, epochs=100,
                       alpha=0.8, modulation_starts=0, modulation_ends=50, warmup_epochs=0),
        "ks": dict(optimizer="sgd", lr=1e-3, lr_milestones=[70], batch_size=64, epochs=100,
                   alpha=0.8, modulation_starts=0, modulation_ends=50, warmup_epochs=0),
        "vggsound": dict(optimizer="sgd", lr=1e-3, lr_milestones=[70], batch_size=64, epochs=100,
                         alpha=0.1, modulation_starts=0, modulation_ends=50, warmup_epochs=0),
        "synthetic": dict(optimizer="sgd", lr=1e-2, lr_milestones=[8], batch_size=32, epochs=10,
                          alpha=0.8, modulation_starts=0, modulation_ends=5, warmup_epochs=0),
    },
    "tpami": {
        "cremad": dict(optimizer="adamw", lr=1e-3, lr_milestones=[20, 40, 60, 80], batch_size=32, epochs=100,
                       alpha=2.6, modulation_starts=0, modulation_ends=80, warmup_epochs=6),
        "ks": dict(optimizer="adamw", lr=5e-5, lr_milestones=[40, 80], batch_size=32, epochs=100,
                   alpha=0.8, modulation_starts=0, modulation_ends=60, warmup_epochs=6),
        "vggsound": dict(optimizer="adamw", lr=5e-5, lr_milestones=[40, 80], batch_size=32, epochs=100,
                         alpha=0.8, modulation_starts=0, modulation_ends=60, warmup_epochs=6),
        "synthetic": dict(optimizer="sgd", lr=1e-2, lr_milestones=[8], batch_size=32, epochs=10,
                          alpha=2.6, modulation_starts=0, modulation_ends=8, warmup_epochs=1),
    },
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
    p.add_argument("--preset", default="cvpr", choices=sorted(PRESETS), help="cvpr = the CVPR 2022 release; tpami = the T-PAMI 2024 release")
    p.add_argument("--modulation", default="ogm_ge", choices=["none", "ogm", "ogm_ge"], help="ogm_ge = OGM plus GE noise")
    p.add_argument("--alpha", type=float, default=None, help="modulation strength alpha (default: preset)")
    p.add_argument("--modulation-starts", type=int, default=None, help="first epoch (0-based) of the modulation window (default: preset)")
    p.add_argument("--modulation-ends", type=int, default=None, help="last epoch (inclusive) of the modulation window (default: preset)")
    p.add_argument("--warmup-epochs", type=int, default=None, help="epochs 0..N-1 are never modulated (default: cvpr 0, tpami 6)")
    p.add_argument("--ratio-offset", type=float, default=0.0, help="k = 1 - tanh(alpha (rho - offset)); 1 = the continuous variant")
    p.add_argument("--ge-std-source", default="unscaled", choices=["unscaled", "scaled"], help="GE noise std from the gradient before or after k")
    p.add_argument("--ge-target", default="both", choices=["both", "dominant"], help="GE noise on both encoders (release) or the modulated one (extension)")
    p.add_argument("--modulate-params", default="conv", choices=["conv", "nonbias"], help="conv = 4-D gradients; nonbias = every non-1-D encoder gradient")
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


# ALGO LOGIC: scores, coefficients and the gradient modulation of OGM(-GE)
def check_fusion(fusion, unimodal):
    """OGM needs per-modality logits from the head: concat and sum split exactly; gated only with the self-gate extension."""
    if fusion == "film" or (fusion == "gated" and unimodal != "self-gate"):
        raise SystemExit(f"--fusion {fusion}: the head cannot be split into unimodal logits for OGM's scores (ogm.md 7, #6; "
                         "the official code crashes here). Use --fusion concat or sum, or --fusion gated --unimodal-logits self-gate.")


@torch.no_grad()
def scores(z_a, z_v, label):
    """Paper Eq. 8: s_m = sum over the batch of softmax(z_m)[y], from the (half-bias) unimodal logits, without gradient.
    Under torchrun the sums run over the global batch (all processes), so every process gets the same coefficients."""
    s_a = torch.softmax(z_a, 1).gather(1, label[:, None]).sum()
    s_v = torch.softmax(z_v, 1).gather(1, label[:, None]).sum()
    s_a, s_v = distributed.all_reduce_sum(torch.stack([s_a, s_v]))
    return s_a, s_v


def coefficients(s_a, s_v, alpha, ratio_offset=0.0):
    """Paper Eq. 9-10: (k_a, k_v). The higher-scoring modality gets 1 - tanh(alpha (rho - offset)), the other 1; audio on a tie."""
    rho_v = s_v / s_a
    rho_a = 1.0 / rho_v
    if rho_v > 1:
        return 1.0, 1.0 - math.tanh(alpha * (rho_v - ratio_offset))
    return 1.0 - math.tanh(alpha * (rho_a - ratio_offset)), 1.0


def modulate_gradients(model, k_a, k_v, noise_a, noise_v, generator=None, std_source="unscaled", params="conv"):
    """After backward: g <- k_m g (+ N(0, (std(g) + 1e-8)^2) if noise_m) for each encoder's conv-kernel gradients.

    Only `model.audio_net` / `model.visual_net` parameters with a 4-D gradient (params="nonbias": any non-1-D gradient)
    are touched; BatchNorm and the head never are. The std is that of the unscaled gradient (std_source="scaled":
    of k g), unbiased; fresh noise for every tensor from `generator`.
    """
    for encoder, k, noise in ((model.audio_net, k_a, noise_a), (model.visual_net, k_v, noise_v)):
        for p in encoder.parameters():
            if p.grad is None or (p.grad.dim() != 4 if params == "conv" else p.grad.dim() < 2):
                continue
            g = p.grad  # edited in place (the same values as g * k + noise * std, without temporary copies)
            std = g.std() + 1e-8 if noise and std_source == "unscaled" else None
            g.mul_(k)
            if noise:
                std = g.std() + 1e-8 if std is None else std
                g.add_(torch.randn(g.shape, generator=generator, device=g.device, dtype=g.dtype).mul_(std))


if __name__ == "__main__":
    args = parse_args()
    args = apply_preset(args, PRESETS[args.preset])  # ALGO LOGIC: the table of --preset
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
    noise_gen = torch.Generator(device=device)  # ALGO LOGIC: GE noise has a stream of its own (data order and
    noise_gen.manual_seed(args.seed + 1_000_000)  # augmentation are unchanged by it), the same in every process

    def logits_fn(audio, visual):
        f_a, f_v, z = model.head(model.audio_net(audio), model.visual_net(visual))
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
        noise_gen.set_state(ckpt["noise_rng"])  # ALGO LOGIC
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
        # ALGO LOGIC: modulate only after the warm-up and inside the inclusive window [starts, ends]
        modulate = (args.modulation != "none" and epoch >= args.warmup_epochs
                    and args.modulation_starts <= epoch <= args.modulation_ends)
        bar = tqdm(train_loader, desc=f"epoch {epoch}", leave=False, disable=args.no_progress)
        for step, (spec, frames, label) in enumerate(bar):
            if args.max_steps and step >= args.max_steps:
                break
            audio, visual, label = spec.unsqueeze(1).to(device), frames.to(device), label.to(device)

            f_a, f_v, z = train_model(lambda m: m.head(m.audio_net(audio), m.visual_net(visual)))  # through DDP
            loss = F.cross_entropy(z, label)  # only the fused loss is back-propagated
            with torch.no_grad():  # ALGO LOGIC: scores s_a, s_v from the half-bias unimodal logits (losses: monitoring)
                z_a, z_v = unimodal_logits(model.head, f_a, f_v, bias="half")
                loss_a, loss_v = F.cross_entropy(z_a, label), F.cross_entropy(z_v, label)
                s_a, s_v = scores(z_a, z_v, label)
            # ALGO LOGIC: the dominant (higher-scoring) modality gets k < 1; audio on a tie
            k_a, k_v = coefficients(s_a.item(), s_v.item(), args.alpha, args.ratio_offset)
            audio_modulated = s_v.item() / s_a.item() <= 1

            optimizer.zero_grad()
            loss.backward()  # under torchrun DDP averages the gradients here: the modulation edits synchronised ones
            if modulate:  # ALGO LOGIC: scale the dominant encoder's conv gradients; GE noise on both (or the dominant)
                ge = args.modulation == "ogm_ge"
                noise_a = ge and (args.ge_target == "both" or audio_modulated)
                noise_v = ge and (args.ge_target == "both" or not audio_modulated)
                modulate_gradients(model, k_a, k_v, noise_a, noise_v, noise_gen, args.ge_std_source, args.modulate_params)
            else:
                k_a, k_v = 1.0, 1.0  # logged: the applied coefficient
            if args.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            optimizer.step()

            stats = {"train/loss": loss.item(), "train/loss_audio": loss_a.item(), "train/loss_visual": loss_v.item(),
                     "train/ratio": (s_a / s_v).item(), "train/coeff_audio": k_a, "train/coeff_visual": k_v,
                     "train/modulated_audio_frac": float(audio_modulated)}  # ALGO LOGIC: OGM's k and the selected side
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
                 "args": vars(args), "class_names": class_names, "noise_rng": noise_gen.get_state()}
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
