# docs and experiment results: docs/arl.md
"""ARL, Asymmetric Representation Learning (Wei, Luo, Luo, ICCV 2025).

Joint training plus (1) the unimodal cross-entropies of the zero-fill logits read out of the shared head,
weighted by gamma after the warm-up, and (2) a GradScale on each encoder output that multiplies the gradient
entering encoder m by 1 + c_m, where c = softmax(T * [d_v w_a, d_a w_v]) pushes the dependence share d_a
(mean |logit|) toward the inverse-variance share w_a (inverse mean entropy). `diff baseline.py arl.py` shows it.
"""

import random

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import distributed, runs
from common.data import build_datasets, make_loaders
from common.evaluate import evaluate
from common.models import AVClassifier, unimodal_logits


# ALGO LOGIC BLOCK: ARL (ICCV 2025 paper): GradScale, the coefficients, the loss. Needs only torch: copy it as is.
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
    sums = reduce(torch.cat([
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


# optimisation settings per dataset (None in a flag = take it from here); milestones are the 0-based epochs at which
# the LR is multiplied by --lr-gamma. ALGO LOGIC: ARL's launch scripts (docs/arl.md, Defaults): LR 1e-3 for epochs
# 0-68, 1e-4 from 69; T, warm-up 0-5, clip 40; gamma 4 on every dataset, the paper's (the release does not run as
# shipped; its KS script has 3). synthetic: baseline.py's optimisation with the CREMA-D method values, warm-up scaled
# 6/100 -> 1 of 10 epochs.
PRESETS = {
    "cremad": dict(optimizer="sgd", lr=1e-3, lr_milestones=[69], batch_size=64, epochs=100, clip_grad=40.0,
                   gamma=4.0, temperature=8.0, warmup_epochs=6),
    "ks": dict(optimizer="sgd", lr=1e-3, lr_milestones=[69], batch_size=64, epochs=100, clip_grad=40.0,
               gamma=4.0, temperature=4.0, warmup_epochs=6),
    "vggsound": dict(optimizer="sgd", lr=1e-3, lr_milestones=[69], batch_size=64, epochs=100, clip_grad=40.0,
                     gamma=4.0, temperature=4.0, warmup_epochs=6),
    "synthetic": dict(optimizer="sgd", lr=1e-2, lr_milestones=[8], batch_size=32, epochs=10, clip_grad=40.0,
                      gamma=4.0, temperature=8.0, warmup_epochs=1),
}


def parse_args(argv=None):
    p = runs.make_parser(__doc__, __file__)
    # Algorithm specific arguments
    p.add_argument("--gamma", type=float, default=None,
                   help="weight of the unimodal losses after the warm-up (default: preset)")
    p.add_argument("--temperature", "--T", type=float, default=None,
                   help="softmax temperature T of the coefficients (default: preset)")
    p.add_argument("--warmup-epochs", type=int, default=None,
                   help="epochs 0..N-1 train L_f + L_a + L_v unscaled (default: preset)")
    p.add_argument("--entropy-floor", type=float, default=0.3, help="floor on the normalised entropy shares h_a, h_v")
    p.add_argument("--arl-weights", default="computed", choices=["computed", "fixed"],
                   help="computed = the paper; fixed = the release (coefficients stay 0.5: both encoders x1.5)")
    p.add_argument(
        "--arl-coeff-timing",
        default="previous",
        choices=["previous", "current"],
        help="multiplier of step t from the coefficients of step t-1 (previous) or of the same batch (current)",
    )
    p.add_argument("--select-after", type=int, default=-1,
                   help="best-epoch selection only over epochs > N (the release: 30)")
    return p.parse_args(argv)


def check_args(args):
    """Valid ranges of ARL's flags and their impossible combinations (after the preset): one line naming the flag."""
    runs.check(args, "gamma", lambda x: x >= 0, ">= 0")
    runs.check(args, "temperature", lambda x: x >= 0, ">= 0 (0: c = (0.5, 0.5), as --arl-weights fixed)")
    runs.check(args, "warmup_epochs", lambda x: x >= 0, ">= 0")
    runs.check(args, "entropy_floor", lambda x: 0 <= x <= 0.5, "in [0, 0.5] (the two shares sum to 1)")
    runs.check(args, "select_after", lambda x: x >= -1, ">= -1 (-1: every epoch)")
    if args.select_after >= args.epochs - 1:
        raise SystemExit(f"--select-after {args.select_after} leaves no epoch to select among {args.epochs}")
    if args.fusion == "film":
        raise SystemExit("--fusion film: ARL needs unimodal logits, which FiLM does not have (docs/models.md)")


def forward(model, audio, visual, coeff):
    """Encoders, GradScale by 1 + c_m on each encoder output (c = 0: unscaled), head, zero-fill unimodal logits.
    coeff: (c_a, c_v), numbers or Coefficients (then read in the backward pass)."""
    a, v = model.audio_net(audio), model.visual_net(visual)
    a, v = GradScale.apply(a, coeff[0]), GradScale.apply(v, coeff[1])  # ALGO LOGIC
    f_a, f_v, z = model.head(a, v)
    z_a, z_v = unimodal_logits(model.head, f_a, f_v, bias="full")  # ALGO LOGIC: zero-fill, full bias
    return a, v, z, z_a, z_v


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
    train_forward = distributed.wrap(model, args)  # DDP under torchrun; --amp

    def eval_logits(audio, visual):
        f_a, f_v, z = model(audio, visual)
        z_a, z_v = unimodal_logits(model.head, f_a, f_v, bias="full")  # ALGO LOGIC: zero-fill, full bias
        return z, z_a, z_v

    def run_eval():
        return evaluate(eval_logits, test_loader, device, num_classes, args.eval_max_steps)

    if args.eval_only:
        runs.evaluate_checkpoint(args, ckpt, model, run_eval)
    run = runs.Run(args, ckpt, model, optimizer, scheduler, select_after=args.select_after)  # ALGO LOGIC: selection
    coeff = tuple(ckpt["arl_coeff"]) if args.resume else (0.5, 0.5)  # ALGO LOGIC: (c_a, c_v), carried across steps

    for epoch in range(run.start_epoch, args.epochs):
        run.begin_epoch()
        model.train()
        loader_gen.manual_seed(args.seed * 100_003 + epoch)  # shuffling and augmentation depend only on (seed, epoch)
        distributed.set_epoch(train_loader)  # torchrun: this process's shard and augmentation stream
        arl_on = epoch >= args.warmup_epochs  # ALGO LOGIC: the warm-up trains L_f + L_a + L_v, unscaled
        bar = tqdm(train_loader, desc=f"epoch {epoch}", leave=False, disable=args.no_progress)
        for step, (spec, frames, label) in enumerate(bar):
            if args.max_steps and step >= args.max_steps:
                break
            audio, visual, label = spec.unsqueeze(1).to(device), frames.to(device), label.to(device)

            # ALGO LOGIC: GradScale (after the warm-up), gamma-weighted unimodal losses, coefficients for the next step
            applied = coeff if arl_on and args.arl_coeff_timing == "previous" else (0.0, 0.0)  # c of the previous step
            scale = (Coefficient(applied[0]), Coefficient(applied[1]))  # read by GradScale in the backward pass
            _, _, z, z_a, z_v = train_forward(lambda m: forward(m, audio, visual, scale))
            loss, loss_f, loss_a, loss_v = arl_loss(z, z_a, z_v, label, args.gamma if arl_on else 1.0)
            arl = arl_coefficients(z_a.detach(), z_v.detach(), args.temperature, args.entropy_floor,
                                   reduce=distributed.all_reduce_sum)  # over the global batch
            if arl_on and args.arl_weights == "computed":
                coeff = (arl["c_a"].item(), arl["c_v"].item())
            if arl_on and args.arl_coeff_timing == "current":  # the same batch's coefficients, before the backward
                applied = coeff
                scale[0].value, scale[1].value = applied

            optimizer.zero_grad()
            loss.backward()
            if args.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            optimizer.step()

            run.log_step(
                {
                    "train/loss": loss.item(),
                    "train/loss_audio": loss_a.item(),
                    "train/loss_visual": loss_v.item(),
                    "train/ratio": (arl["d_a"] / arl["d_v"]).item(),
                    "train/coeff_audio": 1.0 + applied[0],
                    "train/coeff_visual": 1.0 + applied[1],
                    "train/loss_fused": loss_f.item(),
                    "train/dep_audio": arl["d_a"].item(),  # ALGO LOGIC
                    "train/var_share_audio": arl["w_a"].item(),
                    "train/target_ratio": (arl["w_a"] / arl["w_v"]).item(),
                    "train/entropy_audio": arl["entropy_a"].item(),
                    "train/entropy_visual": arl["entropy_v"].item(),
                },
                label.shape[0],
            )
            bar.set_postfix(loss=f"{loss.item():.3f}")
        metrics = run.train_metrics(optimizer)
        scheduler.step()

        model.eval()
        metrics.update(run_eval())
        run.end_epoch(epoch, metrics, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                       "scheduler": scheduler.state_dict(), "class_names": class_names,
                                       "arl_coeff": coeff})  # ALGO LOGIC: the coefficients of the last step
    run.finish()
