# docs and experiment results: docs/dgl.md
"""DGL, Disentangled Gradient Learning (Wei, Luo, Luo, ICCV 2025).

The fused loss trains only the fusion head (it sees detached encoder features); each encoder is trained only by
its own unimodal loss, read out through a detached copy of the shared head (zero-fill, full bias) and weighted by
alpha. One backward pass of L = CE(z) + alpha (CE(z_a) + CE(z_v)) gives exactly the gradients of the release's two
passes (`--dgl-impl two-pass`). `diff baseline.py dgl.py` shows the method.
"""

import random

import numpy as np
from tqdm import tqdm

from common import distributed, runs
from common.data import build_datasets, make_loaders
from common.evaluate import evaluate
from common.models import AVClassifier, GatedHead, unimodal_logits

# the ALGO LOGIC BLOCK below brings its own imports
# isort: split


# ALGO LOGIC BLOCK: DGL (ICCV 2025 paper): the two truncations, the loss, the backward. Brings its imports
# (copy, torch, F): copy it as is.
import copy

import torch
import torch.nn.functional as F


def dgl_logits(head, a, v, readout, impl="single-pass", fused=None):
    """(z, z_a, z_v): fused logits on detached encoder features, unimodal logits that reach only the encoders.

    head(a, v) -> (f_a, f_v, z); readout(head, f_a, f_v) -> (z_a, z_v), the per-modality logits of the head.
    single-pass: the unimodal logits go through a frozen copy of the head, so their gradient reaches only the
    encoders. two-pass: they use the live head, and dgl_backward wipes their head gradient between two passes.
    fused(a, v) -> z replaces head(a.detach(), v.detach()) when the detach sits elsewhere (the release's gated head).
    """
    z = head(a.detach(), v.detach())[2] if fused is None else fused(a, v)  # truncation 1: L_f trains the head only
    uni_head = copy.deepcopy(head).requires_grad_(False) if impl == "single-pass" else head  # truncation 2
    f_a, f_v, _ = uni_head(a, v)
    z_a, z_v = readout(uni_head, f_a, f_v)
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
# END ALGO LOGIC BLOCK


# optimisation settings per dataset (None in a flag = take it from here); milestones are the 0-based epochs at which
# the LR is multiplied by --lr-gamma. ALGO LOGIC: DGL's launch scripts (docs/dgl.md, Defaults): LR 2e-3 for epochs
# 0-68, 2e-4 from 69; alpha; clip 40. synthetic: baseline.py's optimisation with the CREMA-D alpha.
PRESETS = {
    "cremad": dict(optimizer="sgd", lr=2e-3, lr_milestones=[69], batch_size=64, epochs=100, clip_grad=40.0, alpha=4.0),
    "ks": dict(optimizer="sgd", lr=2e-3, lr_milestones=[69], batch_size=64, epochs=100, clip_grad=40.0, alpha=3.0),
    "vggsound": dict(optimizer="sgd", lr=2e-3, lr_milestones=[69], batch_size=64, epochs=100, clip_grad=40.0,
                     alpha=2.0),
    "synthetic": dict(optimizer="sgd", lr=1e-2, lr_milestones=[8], batch_size=32, epochs=10, clip_grad=40.0,
                      alpha=4.0),
}


def parse_args(argv=None):
    p = runs.make_parser(__doc__, __file__)
    # Algorithm specific arguments
    p.add_argument("--alpha", type=float, default=None,
                   help="weight of the unimodal losses that train the encoders (default: preset)")
    p.add_argument(
        "--dgl-impl",
        default="single-pass",
        choices=["single-pass", "two-pass"],
        help="one backward through a frozen head copy, or the release's two backward passes (same gradients)",
    )
    p.add_argument(
        "--gated-release-quirk",
        action="store_true",
        help="gated head: detach after fc_x/fc_y in the fused path as the release does (fc_x, fc_y never train)",
    )
    return p.parse_args(argv)


def check_args(args):
    """Valid ranges of DGL's flags and their impossible combinations (after the preset): one line naming the flag."""
    runs.check(args, "alpha", lambda x: x > 0, "positive (it is the encoders' only loss; 0 never trains them)")
    if args.fusion == "film":
        raise SystemExit("--fusion film: DGL needs unimodal logits, which FiLM does not have (docs/models.md)")
    if args.gated_release_quirk and args.fusion != "gated":
        raise SystemExit(f"--gated-release-quirk needs --fusion gated, not --fusion {args.fusion}")


def readout(head, f_a, f_v):
    return unimodal_logits(head, f_a, f_v, bias="full")  # ALGO LOGIC: zero-fill, full bias


def release_gated_fused(head, a, v):
    """The release's gated head: the detach comes after fc_x, fc_y, so the fused loss never trains them."""
    if not isinstance(head, GatedHead):
        raise SystemExit("--gated-release-quirk needs --fusion gated")
    u_a, u_v, _ = head(a, v)
    return head.fc_out(torch.sigmoid(u_a.detach()) * u_v.detach())


def forward(model, audio, visual, impl, gated_quirk):
    fused = (lambda a, v: release_gated_fused(model.head, a, v)) if gated_quirk else None
    return dgl_logits(model.head, model.audio_net(audio), model.visual_net(visual), readout, impl, fused)


if __name__ == "__main__":
    args, ckpt = runs.setup(parse_args(), PRESETS)  # --resume / --eval-only: the saved run's settings
    check_args(args)  # ranges and combinations of the method flags
    distributed.init(args)  # torchrun: join the process group (no-op in a single process)

    # seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    device = torch.device(args.device)

    # data, model, optimizer
    train_set, test_set, class_names = build_datasets(args)
    num_classes = len(class_names)
    loader_gen = torch.Generator()
    train_loader, test_loader = make_loaders(train_set, test_set, args.batch_size, args.num_workers, loader_gen,
                                             args.pin_memory, args.persistent_workers)
    model = AVClassifier(num_classes, args.fusion, train_set.frontend).to(device)
    optimizer = runs.make_optimizer(args, model.parameters())
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, args.lr_milestones, args.lr_gamma)
    # DDP under torchrun (--dgl-impl two-pass: two backward passes, gradients averaged by sync_grads); --amp
    train_forward = distributed.wrap(
        model, args, ddp=args.dgl_impl == "single-pass", find_unused=args.gated_release_quirk
    )

    def eval_logits(audio, visual):
        f_a, f_v, z = model(audio, visual)
        z_a, z_v = readout(model.head, f_a, f_v)
        return z, z_a, z_v

    def run_eval():
        return evaluate(eval_logits, test_loader, device, num_classes, args.eval_max_steps)

    if args.eval_only:
        runs.evaluate_checkpoint(args, ckpt, model, run_eval)
    run = runs.Run(args, ckpt, model, optimizer, scheduler)  # run folder, logs; --resume: restores the state

    for epoch in range(run.start_epoch, args.epochs):
        run.begin_epoch()
        model.train()
        loader_gen.manual_seed(args.seed * 100_003 + epoch)  # shuffling and augmentation depend only on (seed, epoch)
        distributed.set_epoch(train_loader)  # torchrun: this process's shard and augmentation stream
        bar = tqdm(train_loader, desc=f"epoch {epoch}", leave=False, disable=args.no_progress)
        for step, (spec, frames, label) in enumerate(bar):
            if args.max_steps and step >= args.max_steps:
                break
            audio, visual, label = spec.unsqueeze(1).to(device), frames.to(device), label.to(device)

            # ALGO LOGIC: fused loss -> head only, alpha-weighted unimodal losses -> encoders only
            z, z_a, z_v = train_forward(lambda m: forward(m, audio, visual, args.dgl_impl, args.gated_release_quirk))
            loss, loss_f, loss_a, loss_v = dgl_loss(z, z_a, z_v, label, args.alpha)

            with torch.no_grad():  # monitoring only: the score ratio s_a / s_v (zero-fill logits)
                s_a = torch.softmax(z_a, 1).gather(1, label[:, None]).sum()
                s_v = torch.softmax(z_v, 1).gather(1, label[:, None]).sum()

            optimizer.zero_grad()
            dgl_backward(model.head, loss, loss_f, loss_a, loss_v, args.alpha, args.dgl_impl)  # ALGO LOGIC
            if args.dgl_impl == "two-pass":
                distributed.sync_grads(model)  # torchrun: average the gradients of both passes (no-op in one process)
            norms = {"train/grad_norm_audio": grad_norm(model.audio_net), "train/grad_norm_head": grad_norm(model.head),
                     "train/grad_norm_visual": grad_norm(model.visual_net)}  # ALGO LOGIC: before clipping
            clip_factor = 1.0
            if args.clip_grad > 0:
                total = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
                clip_factor = min(1.0, args.clip_grad / (total.item() + 1e-6))  # the factor clip_grad_norm_ applied
            optimizer.step()

            run.log_step({"train/loss": loss.item(), "train/loss_audio": loss_a.item(),
                          "train/loss_visual": loss_v.item(), "train/ratio": (s_a / s_v).item(),
                          "train/coeff_audio": 1.0, "train/coeff_visual": 1.0,
                          "train/loss_fused": loss_f.item(), "train/clip_factor": clip_factor, **norms},  # ALGO LOGIC
                         label.shape[0])
            bar.set_postfix(loss=f"{loss.item():.3f}")
        metrics = run.train_metrics(optimizer)
        scheduler.step()

        model.eval()
        metrics.update(run_eval())
        run.end_epoch(epoch, metrics, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                       "scheduler": scheduler.state_dict(), "class_names": class_names})
    run.finish()
