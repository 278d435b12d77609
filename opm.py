"""OPM, On-the-fly Prediction Modulation (Wei, Hu, Du, Wen, T-PAMI 2024): joint training, plus after the warm-up the
dominant modality (higher summed true-class probability of the half-bias unimodal logits) gets a drop probability
q = q_base (1 + lam tanh(rho - 1)); on a random p_exe share of steps its pooled feature vector is zeroed per sample
with probability q, both modalities' features are rescaled by 1 / (1 - mean(q)), and samples that lost every modality
are removed. Nothing is dropped at evaluation. Docs: docs/opm.md.
"""

# ALGO LOGIC BLOCK: OPM (T-PAMI 2024 paper, Sec. 4). Brings its imports (math, torch): copy it as is.
import math

import torch


@torch.no_grad()
def opm_scores(z_a, z_v, label):
    """s_m = sum over the batch of softmax(z_m)[y], no gradient. Returns the tensor [s_a, s_v]; when the batch is
    split over processes, sum it over them before `drop_probabilities` (every process then agrees on q)."""
    s_a = torch.softmax(z_a, 1).gather(1, label[:, None]).sum()
    s_v = torch.softmax(z_v, 1).gather(1, label[:, None]).sum()
    return torch.stack([s_a, s_v])


def opm_active(epoch, warmup_epochs, window=None):
    """OPM acts after the warm-up, to the last epoch, or only inside the inclusive window (start, end)."""
    return epoch >= warmup_epochs and (window is None or window[0] <= epoch <= window[1])


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


def rescale_factors(q_a, q_v, rescale="mean", dims=(1, 1)):
    """mean (the release): 1 / (1 - theta) for both, theta = (d_a q_a + d_v q_v) / (d_a + d_v) with (d_a, d_v) =
    dims, the two feature widths (only their ratio matters; equal widths, the default: theta = (q_a + q_v) / 2);
    per-modality: 1 / (1 - q_m); none: 1."""
    if rescale == "mean":
        d_a, d_v = dims
        theta = d_a / (d_a + d_v) * q_a + d_v / (d_a + d_v) * q_v  # equal widths: exactly (q_a + q_v) / 2
        return (1.0 / (1.0 - theta),) * 2 if theta < 1 else (0.0, 0.0)  # theta = 1: every row is dropped anyway
    if rescale == "per-modality":
        return tuple(1.0 / (1.0 - q) if q < 1 else 0.0 for q in (q_a, q_v))
    if rescale == "none":
        return 1.0, 1.0
    raise ValueError(f"rescale_factors: rescale={rescale!r}; use 'mean', 'per-modality' or 'none'")


def drop_features(a, v, label, keep_a, keep_v, q_a, q_v, rescale="mean"):
    """a~ = keep_a a / (1 - theta), v~ likewise (plain products, so autograd scales the gradient the same way; theta
    weighs q_a, q_v by the widths of a (B, d_a) and v (B, d_v)); then keep only the samples with at least one
    modality left. Returns the kept (a~, v~, label)."""
    f_a, f_v = rescale_factors(q_a, q_v, rescale, (a.shape[1], v.shape[1]))
    a = a * (keep_a[:, None] * f_a)
    v = v * (keep_v[:, None] * f_v)
    keep = (keep_a + keep_v) > 0
    return a[keep], v[keep], label[keep]


def opm_drop(a, v, label, q_a, q_v, p_exe, generator, rescale="mean", world_size=1, rank=0):
    """One step of OPM on the pooled features: with probability p_exe, drop each sample's a (v) with probability
    q_a (q_v), rescale, and remove the samples that lost both. Returns (a~, v~, label~, executed, (frac_a, frac_v)).

    Several processes: every process draws the same masks for the global batch (world_size x its rows, from the
    same generator state) and keeps rows rank*B .. (rank+1)*B - 1, so the drop is that of one big batch.
    """
    if not execute_drop(p_exe, generator):
        return a, v, label, False, (0.0, 0.0)
    n = label.shape[0]
    keep_a, keep_v = feature_masks(q_a, q_v, n * world_size, generator)
    keep_a, keep_v = keep_a[rank * n : (rank + 1) * n], keep_v[rank * n : (rank + 1) * n]
    a, v, label = drop_features(a, v, label, keep_a.to(a.device), keep_v.to(v.device), q_a, q_v, rescale)
    return a, v, label, True, (1 - keep_a.mean().item(), 1 - keep_v.mean().item())


def theta_loss(z_a, z_v, label, q_base, lam):
    """theta^2 / 2, theta = (q_a + q_v) / 2 computed with torch from the scores of z_a, z_v, so it keeps their graph.
    Added to the loss of a step whose drop is executed, its gradient theta * d(theta) is the extra term of the journal
    release, whose custom autograd function returns theta as theta's own gradient (z_a, z_v: the half-bias logits of
    the undropped features through a frozen head, as the release's scores; only with --release-theta-grad)."""
    s_a = torch.softmax(z_a, 1).gather(1, label[:, None]).sum()
    s_v = torch.softmax(z_v, 1).gather(1, label[:, None]).sum()
    r_a, r_v = torch.tanh(torch.relu(s_a / s_v - 1)), torch.tanh(torch.relu(s_v / s_a - 1))
    q = torch.stack([q_base * (1 + lam * r_a) * (r_a > 0), q_base * (1 + lam * r_v) * (r_v > 0)]).clamp(0, 1)
    return q.mean() ** 2 / 2


# END ALGO LOGIC BLOCK

# isort: split
import copy
import random

import numpy as np
import torch.nn.functional as F
from tqdm import tqdm

from common import distributed, flags, runs, speed
from common.data import build_datasets, make_loaders, seed_epoch
from common.evaluate import evaluate
from common.models import AVClassifier, unimodal_logits


def release_theta_term(head, a, v, label, q_base, lam):
    """--release-theta-grad: theta_loss of the undropped features' half-bias logits through a frozen copy of the head
    (the release detaches W and b, not the features), so its gradient reaches only the encoders."""
    frozen = copy.deepcopy(head).requires_grad_(False)
    return theta_loss(*unimodal_logits(frozen, *frozen(a, v)[:2], bias="half"), label, q_base, lam)


# per dataset, the optimisation (a flag left out takes its value here; sources in the script's docs page); the LR is
# multiplied by --lr-gamma at each 0-based epoch of lr_milestones
# ALGO LOGIC: KS the release's; CREMA-D the authors' journal CREMA-D optimizer; VGGSound as KS; synthetic baseline.py's
PRESETS = {
    "cremad": dict(optimizer="adamw", lr=1e-3, lr_milestones=[20, 40, 60, 80], batch_size=32, epochs=100),
    "ks": dict(optimizer="adamw", lr=5e-5, lr_milestones=[40, 80], batch_size=32, epochs=100),
    "vggsound": dict(optimizer="adamw", lr=5e-5, lr_milestones=[40, 80], batch_size=32, epochs=100),
    "synthetic": dict(optimizer="sgd", lr=1e-2, lr_milestones=[8], batch_size=32, epochs=10),
}
# ALGO LOGIC: OPM's values per dataset (docs/opm.md, Defaults); synthetic: the warm-up scaled 6/100 -> 1 of 10 epochs
OPM_PRESETS = {
    "cremad": dict(q_base=0.5, lam=0.5, p_exe=0.7, warmup_epochs=6),
    "ks": dict(q_base=0.5, lam=0.5, p_exe=0.7, warmup_epochs=6),
    "vggsound": dict(q_base=0.5, lam=0.5, p_exe=0.7, warmup_epochs=6),
    "synthetic": dict(q_base=0.5, lam=0.5, p_exe=0.7, warmup_epochs=1),
}


def parse_args(argv=None):
    p = flags.parser(__doc__, __file__)  # the shared flags: common/flags.py
    p.add_argument("--fusion", default="concat", choices=["concat", "sum", "gated"], help="fusion head")
    # ALGO LOGIC: OPM's flags (None: the value of OPM_PRESETS for the dataset)
    prob, epoch = flags.between(0, 1), flags.at_least(0, int)
    p.add_argument("--q-base", type=prob, default=None, help="base drop probability of the dominant modality")
    p.add_argument("--lam", type=flags.at_least(0), default=None, help="q = q_base (1 + lam tanh(rho - 1))")
    p.add_argument("--p-exe", type=prob, default=None, help="probability that a step drops at all")
    p.add_argument("--warmup-epochs", type=epoch, default=None, help="epochs 0..N-1 are plain joint training")
    p.add_argument("--opm-window", type=epoch, nargs=2, metavar=("START", "END"), help="drop only in these epochs")
    p.add_argument("--rescale", default="mean", choices=["mean", "per-modality", "none"], help="the dropout rescale")
    p.add_argument("--release-theta-grad", action="store_true", help="the journal release's extra theta gradient")

    args = p.parse_args(argv)
    flags.fill(args, {**PRESETS[args.dataset], **OPM_PRESETS[args.dataset]})
    if args.opm_window and args.opm_window[0] > args.opm_window[1]:
        p.error(f"--opm-window {args.opm_window[0]} {args.opm_window[1]}: START is after END")
    if args.opm_window and args.opm_window[1] < args.warmup_epochs:
        p.error(f"--opm-window ends at epoch {args.opm_window[1]}, before --warmup-epochs {args.warmup_epochs} ends")
    if args.release_theta_grad and args.rescale != "mean":
        p.error(f"--release-theta-grad differentiates theta = mean(q) of --rescale mean, not --rescale {args.rescale}")
    return args


if __name__ == "__main__":
    args, ckpt = runs.saved_run(parse_args())  # --resume / --eval-only: the saved run's settings
    distributed.init_process_group(args)  # torchrun: one process per device (no-op in a single process)
    if args.release_theta_grad and distributed.world_size() > 1:
        raise SystemExit("error: --release-theta-grad needs one process (its theta is the whole batch's)")

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
    # ALGO LOGIC: OPM's draws have a stream of their own (CPU, so any device draws the same masks); data order and
    # augmentation are unchanged by it
    opm_gen = torch.Generator().manual_seed(args.seed + 1_000_000)

    # no drop at evaluation: OPM acts in training only
    def eval_logits(audio, visual):
        f_a, f_v, z = model(audio, visual)
        z_a, z_v = unimodal_logits(model.head, f_a, f_v, bias="half")
        return z, z_a, z_v

    def run_eval():
        return evaluate(eval_logits, test_loader, device, num_classes, args.eval_max_steps)

    if args.eval_only:  # print the checkpoint's test metrics, then exit
        runs.print_evaluation(args.checkpoint, ckpt, model, run_eval)
        raise SystemExit(0)
    run = runs.Run(args, ckpt, model, optimizer, scheduler, (train_set, test_set))  # run folder; --resume
    if args.resume:
        opm_gen.set_state(ckpt["opm_rng"])  # ALGO LOGIC
    for epoch in range(run.start_epoch, args.epochs):
        run.begin_epoch()
        model.train()
        seed_epoch(train_loader, args.seed * 100_003 + epoch)  # shuffle and augmentation: (seed, epoch) only
        opm_on = opm_active(epoch, args.warmup_epochs, args.opm_window)  # ALGO LOGIC
        rescale_sum, n_exec = 0.0, 0  # ALGO LOGIC: the mean rescale factor of the executed drops
        bar = tqdm(train_loader, desc=f"epoch {epoch}", leave=False, disable=args.no_progress)
        for step, (spec, frames, label) in enumerate(bar):
            if args.max_steps and step >= args.max_steps:
                break
            audio, visual, label = spec.unsqueeze(1).to(device), frames.to(device), label.to(device)

            a, v = train_forward(lambda m: (m.audio_net(audio), m.visual_net(visual)))  # ALGO LOGIC: the head later
            with torch.no_grad():  # ALGO LOGIC: the scores come from the full batch, before any drop
                z_a, z_v = unimodal_logits(model.head, *model.head(a, v)[:2], bias="half")
            s = distributed.all_reduce_sum(opm_scores(z_a, z_v, label))  # ALGO LOGIC: over the global batch
            q_a, q_v, executed, y, dropped = 0.0, 0.0, False, label, (0.0, 0.0)  # ALGO LOGIC: no drop by default
            if opm_on:  # ALGO LOGIC: drop probabilities; with probability p_exe mask, rescale, remove empty samples
                q_a, q_v = drop_probabilities(s[0].item(), s[1].item(), args.q_base, args.lam)
                if args.release_theta_grad:  # ALGO LOGIC: theta^2 / 2 of the undropped batch, added on executed drops
                    theta_term = release_theta_term(model.head, a, v, label, args.q_base, args.lam)
                world, rank = distributed.world_size(), distributed.rank()  # every process draws the global masks
                a, v, y, executed, dropped = opm_drop(
                    a, v, label, q_a, q_v, args.p_exe, opm_gen, args.rescale, world, rank
                )
                if executed:  # the logged factor: the mean over the executed drops
                    factor = max(rescale_factors(q_a, q_v, args.rescale, (a.shape[1], v.shape[1])))
                    rescale_sum, n_exec = rescale_sum + factor, n_exec + 1
                if y.shape[0] == 0:  # every sample lost both modalities: skip the step (never with two modalities)
                    continue
            f_a, f_v, z = train_forward(lambda m: m.head(a, v))  # ALGO LOGIC: the head on the kept features
            loss = F.cross_entropy(z, y)  # ALGO LOGIC: the mean over the kept samples
            logs = {"train/loss": loss.item(), **runs.branch_logs(z_a, z_v, label)}

            optimizer.zero_grad()
            (loss + theta_term if executed and args.release_theta_grad else loss).backward()  # ALGO LOGIC
            if args.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            optimizer.step()
            logs["train/ratio"] = (s[0] / s[1]).item()  # ALGO LOGIC: the global batch's ratio
            logs.update({"train/coeff_audio": q_a, "train/coeff_visual": q_v})  # ALGO LOGIC: q
            logs.update({"train/drop_exec_frac": float(executed), "train/drop_frac_audio": dropped[0]})  # ALGO LOGIC
            logs["train/drop_frac_visual"] = dropped[1]  # ALGO LOGIC: the drops
            run.log_step(logs, label.shape[0])
            bar.set_postfix(loss=f"{loss.item():.3f}")
        metrics = run.train_metrics(optimizer)
        metrics["train/rescale"] = rescale_sum / n_exec if n_exec else 1.0  # ALGO LOGIC
        scheduler.step()
        distributed.broadcast_buffers(model)  # torchrun: rank 0's BatchNorm statistics in every process

        model.eval()
        metrics.update(run_eval())
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
        state["opm_rng"] = opm_gen.get_state()  # ALGO LOGIC: OPM's draw stream
        if run.end_epoch(epoch, metrics, {**state, "class_names": class_names}):  # --stop-after-epochs
            break
    run.finish()
