"""DGL, Disentangled Gradient Learning (Wei, Luo, Luo, ICCV 2025): the fused loss trains only the fusion head (it sees
detached encoder features); each encoder is trained only by its own unimodal loss, read out through a detached copy of
the shared head (zero-fill, full bias) and weighted by alpha. One backward pass of L = CE(z) + alpha (CE(z_a) +
CE(z_v)) gives exactly the gradients of the release's two passes (`--dgl-impl two-pass`). Docs: docs/dgl.md.
"""

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

# isort: split
import random

import numpy as np
from tqdm import tqdm

from common import distributed, flags, runs, speed
from common.data import build_datasets, make_loaders, seed_epoch
from common.evaluate import evaluate
from common.models import AVClassifier, GatedHead, unimodal_logits

# per dataset, the optimisation (a flag left out takes its value here; sources in the script's docs page); the LR is
# multiplied by --lr-gamma at each 0-based epoch of lr_milestones
# ALGO LOGIC: DGL's launch scripts: LR 2e-3 for epochs 0-68, 2e-4 from 69; synthetic: baseline.py's
PRESETS = {
    "cremad": dict(optimizer="sgd", lr=2e-3, lr_milestones=[69], batch_size=64, epochs=100),
    "ks": dict(optimizer="sgd", lr=2e-3, lr_milestones=[69], batch_size=64, epochs=100),
    "vggsound": dict(optimizer="sgd", lr=2e-3, lr_milestones=[69], batch_size=64, epochs=100),
    "synthetic": dict(optimizer="sgd", lr=1e-2, lr_milestones=[8], batch_size=32, epochs=10),
}
# ALGO LOGIC: DGL's values per dataset (docs/dgl.md, Defaults): alpha and clip 40; synthetic: the CREMA-D alpha
DGL_PRESETS = {
    "cremad": dict(alpha=4.0, clip_grad=40.0),
    "ks": dict(alpha=3.0, clip_grad=40.0),
    "vggsound": dict(alpha=2.0, clip_grad=40.0),
    "synthetic": dict(alpha=4.0, clip_grad=40.0),
}


def parse_args(argv=None):
    p = flags.parser(__doc__, __file__)  # the shared flags: common/flags.py
    p.add_argument("--fusion", default="concat", choices=["concat", "sum", "gated"], help="fusion head")
    # ALGO LOGIC: DGL's flags (None: the value of DGL_PRESETS for the dataset)
    p.add_argument("--alpha", type=flags.positive(), default=None, help="weight of the unimodal losses (the encoders')")
    p.add_argument("--dgl-impl", default="single-pass", choices=["single-pass", "two-pass"], help="same gradients")
    p.add_argument("--gated-release-quirk", action="store_true", help="the release's gated head: fc_x, fc_y frozen")

    args = p.parse_args(argv)
    flags.fill(args, {**PRESETS[args.dataset], **DGL_PRESETS[args.dataset]})
    if args.gated_release_quirk and args.fusion != "gated":
        p.error(f"--gated-release-quirk needs --fusion gated, not --fusion {args.fusion}")
    return args


ROLES = {"audio": "audio_net", "head": "head", "visual": "visual_net"}  # the logged gradient norms


def readout(head, f_a, f_v):
    return unimodal_logits(head, f_a, f_v, bias="full")  # ALGO LOGIC: zero-fill, full bias


def release_gated_fused(head, a, v):
    """ALGO LOGIC: the release's gated head: the detach comes after fc_x, fc_y, so the fused loss never trains them."""
    if not isinstance(head, GatedHead):
        raise ValueError("--gated-release-quirk needs --fusion gated")
    u_a, u_v, _ = head(a, v)
    return head.fc_out(torch.sigmoid(u_a.detach()) * u_v.detach())


def forward(model, audio, visual, impl, gated_quirk):
    """ALGO LOGIC: (z, z_a, z_v) of DGL's two truncations for the script's model."""
    fused = (lambda a, v: release_gated_fused(model.head, a, v)) if gated_quirk else None
    return dgl_logits(model.head, model.audio_net(audio), model.visual_net(visual), readout, impl, fused)


if __name__ == "__main__":
    args, ckpt = runs.saved_run(parse_args())  # --resume / --eval-only: the saved run's settings
    distributed.init_process_group(args)  # torchrun: one process per device (no-op in a single process)

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
    train_loader, test_loader = make_loaders(train_set, test_set, args, torch.Generator())
    model = AVClassifier(num_classes, args.fusion, train_set.frontend).to(device)
    if args.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), args.lr, momentum=0.9, weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, args.lr_milestones, args.lr_gamma)
    # ALGO LOGIC: --dgl-impl two-pass makes two backward passes, which DDP cannot follow: sync_grads averages them
    single = args.dgl_impl == "single-pass"
    train_forward = distributed.ddp(speed.train_forward(model, args), args, args.gated_release_quirk, enabled=single)

    def eval_logits(audio, visual):
        f_a, f_v, z = model(audio, visual)
        z_a, z_v = readout(model.head, f_a, f_v)  # ALGO LOGIC
        return z, z_a, z_v

    def run_eval():
        return evaluate(eval_logits, test_loader, device, num_classes, args.eval_max_steps)

    if args.eval_only:  # print the checkpoint's test metrics, then exit
        runs.print_evaluation(args.checkpoint, ckpt, model, run_eval)
        raise SystemExit(0)
    run = runs.Run(args, ckpt, model, optimizer, scheduler, (train_set, test_set))  # run folder; --resume
    for epoch in range(run.start_epoch, args.epochs):
        run.begin_epoch()
        model.train()
        seed_epoch(train_loader, args.seed * 100_003 + epoch)  # shuffle and augmentation: (seed, epoch) only
        bar = tqdm(train_loader, desc=f"epoch {epoch}", leave=False, disable=args.no_progress)
        for step, (spec, frames, label) in enumerate(bar):
            if args.max_steps and step >= args.max_steps:
                break
            audio, visual, label = spec.unsqueeze(1).to(device), frames.to(device), label.to(device)

            # ALGO LOGIC: fused loss -> head only, alpha-weighted unimodal losses -> encoders only
            z, z_a, z_v = train_forward(lambda m: forward(m, audio, visual, args.dgl_impl, args.gated_release_quirk))
            loss, loss_f, loss_a, loss_v = dgl_loss(z, z_a, z_v, label, args.alpha)

            logs = {"train/loss": loss.item(), **runs.branch_logs(z_a, z_v, label)}

            optimizer.zero_grad()
            dgl_backward(model.head, loss, loss_f, loss_a, loss_v, args.alpha, args.dgl_impl)  # ALGO LOGIC
            if not single:
                distributed.sync_grads(model)  # ALGO LOGIC: torchrun: average the gradients of both passes
            norms = {f"train/grad_norm_{k}": grad_norm(getattr(model, m)) for k, m in ROLES.items()}  # ALGO LOGIC
            clip_factor = 1.0
            if args.clip_grad > 0:
                total = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
                clip_factor = min(1.0, args.clip_grad / (total.item() + 1e-6))  # the factor clip_grad_norm_ applied
            optimizer.step()
            logs.update({"train/loss_fused": loss_f.item(), "train/clip_factor": clip_factor, **norms})  # ALGO LOGIC
            run.log_step(logs, label.shape[0])
            bar.set_postfix(loss=f"{loss.item():.3f}")
        metrics = run.train_metrics(optimizer)
        scheduler.step()
        distributed.broadcast_buffers(model)  # torchrun: rank 0's BatchNorm statistics in every process

        model.eval()
        metrics.update(run_eval())
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
        if run.end_epoch(epoch, metrics, {**state, "class_names": class_names}):  # --stop-after-epochs
            break
    run.finish()
