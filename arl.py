"""ARL, Asymmetric Representation Learning (Wei, Luo, Luo, ICCV 2025): joint training plus (1) the unimodal
cross-entropies of the zero-fill logits read out of the shared head, weighted by gamma after the warm-up, and (2) a
GradScale on each encoder output that multiplies the gradient entering encoder m by 1 + c_m, where
c = softmax(T * [d_v w_a, d_a w_v]) pushes the dependence share d_a (mean |logit|) toward the inverse-variance share
w_a (inverse mean entropy). Docs: docs/arl.md.
"""

# ALGO LOGIC BLOCK: ARL (ICCV 2025 paper): GradScale, the coefficients, the loss. Brings its imports (torch, F):
# copy it as is.
import torch
import torch.nn.functional as F


class GradScale(torch.autograd.Function):
    """Identity in the forward pass; multiplies the gradient by (1 + w) in the backward pass (w a constant, no
    gradient). `w` is read when the gradient arrives: a number, or a Coefficient set after the forward pass."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.w = w
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * (1.0 + float(ctx.w)), None  # no gradient for w


class Coefficient:
    """A GradScale coefficient that may be set between the forward and the backward pass (the coefficients of the
    same batch, computed from the logits of that forward pass): GradScale reads float(c) in the backward pass."""

    def __init__(self, value=0.0):
        self.value = float(value)

    def __float__(self):
        return self.value


def arl_coefficients(z_a, z_v, temperature, entropy_floor=0.3, reduce=lambda t: t):
    """ARL's statistics of one batch of (detached) zero-fill unimodal logits.

    d_a: dependence share, from the mean absolute logit; w_a: inverse-variance share, from the mean entropy
    (floored at `entropy_floor`); c = softmax(T [d_v w_a, d_a w_v]) = (sigmoid(T (w_a - d_a)), 1 - c_a).
    `reduce` sums a tensor over processes when the batch is split (DDP): per-class |logit| sums, entropy sums and the
    sample count are summed first, then divided, so the means are the global batch's.
    """
    p_a, p_v = torch.softmax(z_a, 1), torch.softmax(z_v, 1)
    c = z_a.shape[1]
    sums = reduce(
        torch.cat(
            [
                z_a.abs().sum(0),
                z_v.abs().sum(0),
                -(p_a * torch.log(p_a + 1e-16)).sum(1).sum()[None],
                -(p_v * torch.log(p_v + 1e-16)).sum(1).sum()[None],
                z_a.new_tensor([z_a.shape[0]]),
            ]
        )
    )
    n = sums[-1]
    dep_a, dep_v = (sums[:c] / n).sum(), (sums[c : 2 * c] / n).sum()
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
    return {
        "c_a": c[0],
        "c_v": c[1],
        "d_a": d_a,
        "d_v": d_v,
        "w_a": w_a,
        "w_v": w_v,
        "entropy_a": ent_a,
        "entropy_v": ent_v,
    }


def arl_loss(z, z_a, z_v, label, weight):
    """L = CE(z) + weight (CE(z_a) + CE(z_v)); weight is gamma after the warm-up and 1 during it."""
    loss_f, loss_a, loss_v = F.cross_entropy(z, label), F.cross_entropy(z_a, label), F.cross_entropy(z_v, label)
    return loss_f + weight * (loss_a + loss_v), loss_f, loss_a, loss_v


# END ALGO LOGIC BLOCK

# isort: split
import random

import numpy as np
from tqdm import tqdm

from common import distributed, flags, runs, speed
from common.data import build_datasets, make_loaders, seed_epoch
from common.evaluate import evaluate
from common.models import AVClassifier, unimodal_logits

# per dataset, the optimisation (a flag left out takes its value here; sources in the script's docs page); the LR is
# multiplied by --lr-gamma at each 0-based epoch of lr_milestones
# ALGO LOGIC: ARL's launch scripts: LR 1e-3 for epochs 0-68, 1e-4 from 69; synthetic: baseline.py's
PRESETS = {
    "cremad": dict(optimizer="sgd", lr=1e-3, lr_milestones=[69], batch_size=64, epochs=100),
    "ks": dict(optimizer="sgd", lr=1e-3, lr_milestones=[69], batch_size=64, epochs=100),
    "vggsound": dict(optimizer="sgd", lr=1e-3, lr_milestones=[69], batch_size=64, epochs=100),
    "synthetic": dict(optimizer="sgd", lr=1e-2, lr_milestones=[8], batch_size=32, epochs=10),
}
# ALGO LOGIC: ARL's values per dataset (docs/arl.md, Defaults): T, warm-up 0-5, clip 40; gamma 4 everywhere, the
# paper's (the release does not run as shipped; its KS script has 3); synthetic: the CREMA-D values, warm-up 6 -> 1
ARL_PRESETS = {
    "cremad": dict(gamma=4.0, temperature=8.0, warmup_epochs=6, clip_grad=40.0),
    "ks": dict(gamma=4.0, temperature=4.0, warmup_epochs=6, clip_grad=40.0),
    "vggsound": dict(gamma=4.0, temperature=4.0, warmup_epochs=6, clip_grad=40.0),
    "synthetic": dict(gamma=4.0, temperature=8.0, warmup_epochs=1, clip_grad=40.0),
}


def parse_args(argv=None):
    p = flags.parser(__doc__, __file__)  # the shared flags: common/flags.py
    p.add_argument("--fusion", default="concat", choices=["concat", "sum", "gated"], help="fusion head")
    # ALGO LOGIC: ARL's flags (None: the value of ARL_PRESETS for the dataset)
    nonneg = flags.at_least(0)
    p.add_argument("--gamma", type=nonneg, default=None, help="weight of the unimodal losses after the warm-up")
    p.add_argument("--temperature", "--T", type=nonneg, default=None, help="softmax temperature T of the coefficients")
    p.add_argument("--warmup-epochs", type=flags.at_least(0, int), default=None, help="epochs 0..N-1: L_f + L_a + L_v")
    p.add_argument("--entropy-floor", type=flags.between(0, 0.5), default=0.3, help="floor on the entropy shares")
    p.add_argument("--arl-weights", default="computed", choices=["computed", "fixed"], help="the paper or the release")
    p.add_argument("--arl-coeff-timing", default="previous", choices=["previous", "current"], help="c of step t-1 or t")
    p.add_argument("--select-after", type=flags.at_least(-1, int), default=-1, help="best epoch among epochs > N only")

    args = p.parse_args(argv)
    flags.fill(args, {**PRESETS[args.dataset], **ARL_PRESETS[args.dataset]})
    if args.select_after >= args.epochs - 1:
        p.error(f"--select-after {args.select_after} leaves no epoch to select among {args.epochs}")
    return args


def forward(model, audio, visual, coeff):
    """ALGO LOGIC: encoders, GradScale by 1 + c_m on each encoder output (c = 0: unscaled), head, and the zero-fill
    (full bias) unimodal logits. coeff: (c_a, c_v), numbers or Coefficients (then read in the backward pass)."""
    a, v = model.audio_net(audio), model.visual_net(visual)
    a, v = GradScale.apply(a, coeff[0]), GradScale.apply(v, coeff[1])
    f_a, f_v, z = model.head(a, v)
    z_a, z_v = unimodal_logits(model.head, f_a, f_v, bias="full")
    return f_a, f_v, z, z_a, z_v


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
    train_forward = distributed.ddp(speed.train_forward(model, args), args)  # --amp; torchrun: DDP

    def eval_logits(audio, visual):
        f_a, f_v, z = model(audio, visual)
        z_a, z_v = unimodal_logits(model.head, f_a, f_v, bias="full")  # ALGO LOGIC: zero-fill, full bias
        return z, z_a, z_v

    def run_eval():
        return evaluate(eval_logits, test_loader, device, num_classes, args.eval_max_steps)

    if args.eval_only:  # print the checkpoint's test metrics, then exit
        runs.print_evaluation(args.checkpoint, ckpt, model, run_eval)
        raise SystemExit(0)
    run = runs.Run(args, ckpt, model, optimizer, scheduler, (train_set, test_set), select_after=args.select_after)
    coeff = tuple(ckpt["arl_coeff"]) if args.resume else (0.5, 0.5)  # ALGO LOGIC: (c_a, c_v), carried across steps
    for epoch in range(run.start_epoch, args.epochs):
        run.begin_epoch()
        model.train()
        seed_epoch(train_loader, args.seed * 100_003 + epoch)  # shuffle and augmentation: (seed, epoch) only
        arl_on = epoch >= args.warmup_epochs  # ALGO LOGIC: the warm-up trains L_f + L_a + L_v, unscaled
        bar = tqdm(train_loader, desc=f"epoch {epoch}", leave=False, disable=args.no_progress)
        for step, (spec, frames, label) in enumerate(bar):
            if args.max_steps and step >= args.max_steps:
                break
            audio, visual, label = spec.unsqueeze(1).to(device), frames.to(device), label.to(device)

            # ALGO LOGIC: GradScale by the coefficients of the previous step (after the warm-up), gamma-weighted
            # unimodal losses, and the coefficients of this batch for the next step
            applied = coeff if arl_on and args.arl_coeff_timing == "previous" else (0.0, 0.0)
            scale = (Coefficient(applied[0]), Coefficient(applied[1]))  # read by GradScale in the backward pass
            f_a, f_v, z, z_a, z_v = train_forward(lambda m: forward(m, audio, visual, scale))
            loss, loss_f, loss_a, loss_v = arl_loss(z, z_a, z_v, label, args.gamma if arl_on else 1.0)
            reduce = distributed.all_reduce_sum  # the statistics of the global batch
            arl = arl_coefficients(z_a.detach(), z_v.detach(), args.temperature, args.entropy_floor, reduce=reduce)
            if arl_on and args.arl_weights == "computed":
                coeff = (arl["c_a"].item(), arl["c_v"].item())
            if arl_on and args.arl_coeff_timing == "current":  # the same batch's coefficients, before the backward
                applied = coeff
                scale[0].value, scale[1].value = applied

            logs = {"train/loss": loss.item(), **runs.branch_logs(z_a, z_v, label)}

            optimizer.zero_grad()
            loss.backward()
            if args.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            optimizer.step()
            # ALGO LOGIC: the dependence ratio d_a / d_v, the applied 1 + c and ARL's statistics
            logs.update(
                {
                    "train/ratio": (arl["d_a"] / arl["d_v"]).item(),
                    "train/coeff_audio": 1.0 + applied[0],
                    "train/coeff_visual": 1.0 + applied[1],
                    "train/loss_fused": loss_f.item(),
                    "train/dep_audio": arl["d_a"].item(),
                    "train/var_share_audio": arl["w_a"].item(),
                    "train/target_ratio": (arl["w_a"] / arl["w_v"]).item(),
                    "train/entropy_audio": arl["entropy_a"].item(),
                    "train/entropy_visual": arl["entropy_v"].item(),
                }
            )

            run.log_step(logs, label.shape[0])
            bar.set_postfix(loss=f"{loss.item():.3f}")
        metrics = run.train_metrics(optimizer)
        scheduler.step()
        distributed.broadcast_buffers(model)  # torchrun: rank 0's BatchNorm statistics in every process

        model.eval()
        metrics.update(run_eval())
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
        state["arl_coeff"] = coeff  # ALGO LOGIC: the coefficients of the last step
        if run.end_epoch(epoch, metrics, {**state, "class_names": class_names}):  # --stop-after-epochs
            break
    run.finish()
