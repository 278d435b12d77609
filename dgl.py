# docs and experiment results: docs/dgl.md
"""DGL, Disentangled Gradient Learning (Wei, Luo, Luo, ICCV 2025; spec: ../shared/reference/dgl.md).

The fused loss trains only the fusion head (it sees detached encoder features); each encoder is trained only by
its own unimodal loss, read out through a detached copy of the shared head (zero-fill, full bias) and weighted by
alpha. One backward pass of L = CE(z) + alpha (CE(z_a) + CE(z_v)) gives exactly the gradients of the release's two
passes (`--dgl-impl two-pass`). `diff baseline.py dgl.py` shows the method.
"""

import argparse
import copy
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
from common.models import AVClassifier, GatedHead, unimodal_logits
from common.utils import (RunLogger, apply_preset, capture_rng, format_metrics, load_checkpoint, make_run_dir,
                          merge_saved_args, restore_rng, run_name, save_checkpoint)

# official optimisation settings per dataset (None in a flag = take it from here); milestones are the 0-based
# epochs at which the effective LR is multiplied by lr_gamma (README of ../shared/reference, "Official defaults")
# ALGO LOGIC: DGL's launch scripts (dgl.md section 4): LR 2e-3 for epochs 0-68, 2e-4 from 69; alpha; clip 40.
# synthetic: baseline.py's optimisation with the CREMA-D alpha.
PRESETS = {
    "cremad": dict(optimizer="sgd", lr=2e-3, lr_milestones=[69], batch_size=64, epochs=100, clip_grad=40.0, alpha=4.0),
    "ks": dict(optimizer="sgd", lr=2e-3, lr_milestones=[69], batch_size=64, epochs=100, clip_grad=40.0, alpha=3.0),
    "vggsound": dict(optimizer="sgd", lr=2e-3, lr_milestones=[69], batch_size=64, epochs=100, clip_grad=40.0, alpha=2.0),
    "synthetic": dict(optimizer="sgd", lr=1e-2, lr_milestones=[8], batch_size=32, epochs=10, clip_grad=40.0, alpha=4.0),
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
    p.add_argument("--alpha", type=float, default=None, help="weight of the unimodal losses that train the encoders (default: preset)")
    p.add_argument("--dgl-impl", default="single-pass", choices=["single-pass", "two-pass"],
                   help="one backward through a detached head copy, or the release's two backward passes (same gradients)")
    p.add_argument("--gated-release-quirk", action="store_true",
                   help="gated head: detach after fc_x/fc_y in the fused path as the release does (fc_x, fc_y never train)")
    add_data_args(p)
    distributed.add_speed_args(p)
    return p.parse_args(argv)


def make_optimizer(args, model):
    if args.optimizer == "sgd":
        wd = 1e-4 if args.weight_decay is None else args.weight_decay
        return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=wd)
    wd = 0.01 if args.weight_decay is None else args.weight_decay
    return torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=wd)


# ALGO LOGIC: DGL's two truncations, its loss and its backward pass
def dgl_logits(head, a, v, impl="single-pass", gated_quirk=False):
    """(z, z_a, z_v): fused logits on detached encoder features, zero-fill unimodal logits (full bias).

    single-pass: the unimodal logits go through a detached copy of the head, so they reach only the encoders.
    two-pass: they use the live head, and dgl_backward wipes their head gradient between two backward passes.
    gated_quirk: the release's gated head detaches after fc_x, fc_y in the fused path (they then never train).
    """
    if gated_quirk:
        if not isinstance(head, GatedHead):
            raise ValueError("--gated-release-quirk needs --fusion gated")
        u_a, u_v, _ = head(a, v)
        z = head.fc_out(torch.sigmoid(u_a.detach()) * u_v.detach())
    else:
        _, _, z = head(a.detach(), v.detach())
    uni_head = copy.deepcopy(head).requires_grad_(False) if impl == "single-pass" else head
    f_a, f_v, _ = uni_head(a, v)
    z_a, z_v = unimodal_logits(uni_head, f_a, f_v, bias="full")
    return z, z_a, z_v


def dgl_loss(z, z_a, z_v, label, alpha):
    """L = CE(z) + alpha (CE(z_a) + CE(z_v)); returns (L, L_f, L_a, L_v)."""
    loss_f, loss_a, loss_v = F.cross_entropy(z, label), F.cross_entropy(z_a, label), F.cross_entropy(z_v, label)
    return loss_f + alpha * (loss_a + loss_v), loss_f, loss_a, loss_v


def dgl_backward(head, loss, loss_f, loss_a, loss_v, alpha, impl="single-pass"):
    """single-pass: L.backward(). two-pass (release): unimodal backward, head gradients set to None, fused backward."""
    if impl == "single-pass":
        loss.backward()
        return
    (alpha * (loss_a + loss_v)).backward(retain_graph=True)
    for p in head.parameters():
        p.grad = None
    loss_f.backward()


def grad_norm(module):
    """Global L2 norm of a module's gradients (monitoring)."""
    norms = [torch.linalg.vector_norm(p.grad.detach()) for p in module.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)).item() if norms else 0.0


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
    # DDP under torchrun (--dgl-impl two-pass: two backward passes, gradients averaged by sync_grads); --amp
    train_model = distributed.wrap(model, args, ddp=args.dgl_impl == "single-pass", find_unused=args.gated_release_quirk)

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

            # ALGO LOGIC: fused loss -> head only, alpha-weighted unimodal losses -> encoders only
            z, z_a, z_v = train_model(lambda m: dgl_logits(m.head, m.audio_net(audio), m.visual_net(visual), args.dgl_impl,
                                                           args.gated_release_quirk))  # through DDP
            loss, loss_f, loss_a, loss_v = dgl_loss(z, z_a, z_v, label, args.alpha)
            with torch.no_grad():  # monitoring only: the score ratio s_a / s_v (zero-fill logits)
                s_a = torch.softmax(z_a, 1).gather(1, label[:, None]).sum()
                s_v = torch.softmax(z_v, 1).gather(1, label[:, None]).sum()

            optimizer.zero_grad()
            dgl_backward(model.head, loss, loss_f, loss_a, loss_v, args.alpha, args.dgl_impl)
            if args.dgl_impl == "two-pass":
                distributed.sync_grads(model)  # torchrun: average the gradients of both passes (no-op in one process)
            norms = {"train/grad_norm_audio": grad_norm(model.audio_net), "train/grad_norm_visual": grad_norm(model.visual_net),
                     "train/grad_norm_head": grad_norm(model.head)}  # ALGO LOGIC: before clipping
            clip_factor = 1.0
            if args.clip_grad > 0:
                total = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
                clip_factor = min(1.0, args.clip_grad / (total.item() + 1e-6))  # the factor clip_grad_norm_ applied
            optimizer.step()

            stats = {"train/loss": loss.item(), "train/loss_audio": loss_a.item(), "train/loss_visual": loss_v.item(),
                     "train/ratio": (s_a / s_v).item(), "train/coeff_audio": 1.0, "train/coeff_visual": 1.0,
                     "train/loss_fused": loss_f.item(), "train/clip_factor": clip_factor, **norms}  # ALGO LOGIC: DGL's extras
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
