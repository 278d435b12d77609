# docs and experiment results: docs/opm.md
"""OPM, On-the-fly Prediction Modulation (Wei, Hu, Du, Wen, T-PAMI 2024).

Joint training, plus: after the warm-up, the dominant modality (higher summed true-class probability of the
half-bias unimodal logits) gets a drop probability q = q_base (1 + lam tanh(rho - 1)); on a random p_exe share of
steps its pooled feature vector is zeroed per sample with probability q, both modalities' features are rescaled by
1 / (1 - mean(q)), and samples that lost every modality are removed. Nothing is dropped at evaluation.
"""

import copy
import math
import random

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import distributed, runs
from common.data import build_datasets, make_loaders
from common.evaluate import evaluate
from common.models import AVClassifier, unimodal_logits


# ALGO LOGIC BLOCK: OPM (T-PAMI 2024 paper, Sec. 4). Needs only `math` and `torch`: copy it as is.
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


def rescale_factors(q_a, q_v, rescale="mean"):
    """mean: 1 / (1 - theta) for both, theta = (q_a + q_v) / 2 (d_a = d_v = 512); per-modality: 1 / (1 - q_m);
    none: 1."""
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
    keep_a, keep_v = keep_a[rank * n:(rank + 1) * n], keep_v[rank * n:(rank + 1) * n]
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


def release_theta_term(head, a, v, label, q_base, lam):
    """--release-theta-grad: theta_loss of the undropped features' half-bias logits through a frozen copy of the head
    (the release detaches W and b, not the features), so its gradient reaches only the encoders."""
    frozen = copy.deepcopy(head).requires_grad_(False)
    return theta_loss(*unimodal_logits(frozen, *frozen(a, v)[:2], bias="half"), label, q_base, lam)


# optimisation settings per dataset (None in a flag = take it from here); milestones are the 0-based epochs at which
# the LR is multiplied by --lr-gamma. ALGO LOGIC: sources in docs/opm.md (Defaults). KS: the release, AdamW 5e-5,
# x0.1 after epochs 39 and 79. CREMA-D: the authors' journal CREMA-D optimizer (x0.1 every 20 epochs). VGGSound: as
# KS. synthetic: baseline.py's optimisation with the CREMA-D method values, warm-up scaled 6/100 -> 1 of 10 epochs.
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
    p = runs.make_parser(__doc__, __file__)
    # Algorithm specific arguments
    p.add_argument("--q-base", type=float, default=None,
                   help="base drop probability of the dominant modality (default: preset, 0.5)")
    p.add_argument("--lam", type=float, default=None,
                   help="extra drop strength lambda: q = q_base (1 + lam tanh(rho - 1)) (default: preset)")
    p.add_argument("--p-exe", type=float, default=None,
                   help="probability that a step drops at all (default: preset, 0.7)")
    p.add_argument("--warmup-epochs", type=int, default=None,
                   help="epochs 0..N-1 are plain joint training (default: preset)")
    p.add_argument(
        "--opm-window",
        type=int,
        nargs=2,
        default=None,
        metavar=("START", "END"),
        help="drop only in epochs START..END inclusive (default: from the end of the warm-up to the last epoch)",
    )
    p.add_argument("--rescale", default="mean", choices=["mean", "per-modality", "none"],
                   help="mean = both modalities / (1 - mean(q)) (release); per-modality = each / (1 - q_m) (extension)")
    p.add_argument("--release-theta-grad", action="store_true",
                   help="add the journal release's extra gradient theta d(theta) on executed drops (its autograd "
                   "function returns theta as theta's gradient; off: that release does not import as shipped)")
    p.add_argument(
        "--unimodal-logits",
        default="split",
        choices=["split", "self-gate"],
        help="split = slice the head (concat, sum); self-gate = gated head, each modality gates itself (extension)",
    )
    return p.parse_args(argv)


def check_args(args):
    """Valid ranges of OPM's flags and their impossible combinations (after the preset): one line naming the flag."""
    for name in ("q_base", "p_exe"):
        runs.check(args, name, lambda x: 0 <= x <= 1, "a probability in [0, 1]")
    runs.check(args, "lam", lambda x: x >= 0, ">= 0 (below 0 the dominant modality would be dropped less)")
    runs.check(args, "warmup_epochs", lambda x: x >= 0, ">= 0")
    runs.check(args, "opm_window", lambda x: x >= 0, "two 0-based epochs >= 0")
    if args.opm_window and args.opm_window[0] > args.opm_window[1]:
        raise SystemExit(f"--opm-window {args.opm_window[0]} {args.opm_window[1]}: START is after END")
    if args.opm_window and args.opm_window[1] < args.warmup_epochs:
        raise SystemExit(f"--opm-window ends at epoch {args.opm_window[1]}, before --warmup-epochs "
                         f"{args.warmup_epochs} ends: OPM would never act; lower --warmup-epochs")
    if args.unimodal_logits == "self-gate" and args.fusion != "gated":
        raise SystemExit(f"--unimodal-logits self-gate reads the gated head, not --fusion {args.fusion}: add "
                         "--fusion gated or drop it")
    if args.release_theta_grad and args.rescale != "mean":
        raise SystemExit(f"--release-theta-grad differentiates the release's theta = mean(q), the factor of --rescale "
                         f"mean, not --rescale {args.rescale}: drop one of them")


def check_fusion(fusion, unimodal):
    """OPM's scores need per-modality logits: concat and sum split exactly; gated only with self-gate."""
    if fusion == "film" or (fusion == "gated" and unimodal != "self-gate"):
        raise SystemExit(f"--fusion {fusion}: the head cannot be split into unimodal logits for OPM's scores "
                         "(docs/models.md). Use --fusion concat or sum, or --fusion gated --unimodal-logits self-gate.")


if __name__ == "__main__":
    args, ckpt = runs.setup(parse_args(), PRESETS)  # --resume / --eval-only: the saved run's settings
    check_fusion(args.fusion, args.unimodal_logits)  # ALGO LOGIC: film/gated have no unimodal split
    check_args(args)  # ranges and combinations of the method flags
    distributed.init(args)  # torchrun: join the process group (no-op in a single process)
    if args.release_theta_grad and distributed.world_size() > 1:
        raise SystemExit("--release-theta-grad needs one process: the release's theta gradient is that of the whole "
                         "batch's scores, which torchrun splits")

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
    opm_gen = torch.Generator()  # ALGO LOGIC: OPM's draws have a stream of their own (CPU, so any device draws
    opm_gen.manual_seed(args.seed + 1_000_000)  # the same masks); data order and augmentation are unchanged by it

    def eval_logits(audio, visual):
        f_a, f_v, z = model(audio, visual)  # ALGO LOGIC: no drop at evaluation
        z_a, z_v = unimodal_logits(model.head, f_a, f_v, bias="half")
        return z, z_a, z_v

    def run_eval():
        return evaluate(eval_logits, test_loader, device, num_classes, args.eval_max_steps)

    if args.eval_only:
        runs.evaluate_checkpoint(args, ckpt, model, run_eval)
    run = runs.Run(args, ckpt, model, optimizer, scheduler)  # run folder, logs; --resume: restores the state
    if args.resume:
        opm_gen.set_state(ckpt["opm_rng"])  # ALGO LOGIC

    for epoch in range(run.start_epoch, args.epochs):
        run.begin_epoch()
        model.train()
        loader_gen.manual_seed(args.seed * 100_003 + epoch)  # shuffling and augmentation depend only on (seed, epoch)
        distributed.set_epoch(train_loader)  # torchrun: this process's shard and augmentation stream
        opm_on = opm_active(epoch, args.warmup_epochs, args.opm_window)  # ALGO LOGIC
        rescale_sum, n_exec = 0.0, 0  # ALGO LOGIC: the mean rescale factor of the executed drops
        bar = tqdm(train_loader, desc=f"epoch {epoch}", leave=False, disable=args.no_progress)
        for step, (spec, frames, label) in enumerate(bar):
            if args.max_steps and step >= args.max_steps:
                break
            audio, visual, label = spec.unsqueeze(1).to(device), frames.to(device), label.to(device)

            a, v = train_forward(lambda m: (m.audio_net(audio), m.visual_net(visual)))  # the head follows the drop
            with torch.no_grad():  # ALGO LOGIC: scores from the full batch before any drop (losses: monitoring only)
                z_a, z_v = unimodal_logits(model.head, *model.head(a, v)[:2], bias="half")
                loss_a, loss_v = F.cross_entropy(z_a, label), F.cross_entropy(z_v, label)
            s = distributed.all_reduce_sum(opm_scores(z_a, z_v, label))  # ALGO LOGIC: over the global batch
            # ALGO LOGIC: drop probabilities; the drop with probability p_exe (mask, rescale, remove empty samples)
            q_a, q_v, executed, y, dropped = 0.0, 0.0, False, label, (0.0, 0.0)
            if opm_on:
                q_a, q_v = drop_probabilities(s[0].item(), s[1].item(), args.q_base, args.lam)
                if args.release_theta_grad:  # ALGO LOGIC: theta^2 / 2 of the undropped batch, added on executed drops
                    theta_term = release_theta_term(model.head, a, v, label, args.q_base, args.lam)
                a, v, y, executed, dropped = opm_drop(a, v, label, q_a, q_v, args.p_exe, opm_gen, args.rescale,
                                                      distributed.world_size(), distributed.rank())
                if executed:
                    rescale_sum, n_exec = rescale_sum + max(rescale_factors(q_a, q_v, args.rescale)), n_exec + 1
                if y.shape[0] == 0:  # every sample lost both modalities: skip the step (never with two modalities)
                    continue
            f_a, f_v, z = train_forward(lambda m: m.head(a, v))
            loss = F.cross_entropy(z, y)  # mean over the kept samples; only the fused loss is back-propagated

            optimizer.zero_grad()
            (loss + theta_term if executed and args.release_theta_grad else loss).backward()  # ALGO LOGIC
            if args.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            optimizer.step()

            run.log_step({"train/loss": loss.item(), "train/loss_audio": loss_a.item(),
                          "train/loss_visual": loss_v.item(), "train/ratio": (s[0] / s[1]).item(),
                          "train/coeff_audio": q_a, "train/coeff_visual": q_v,  # ALGO LOGIC: OPM's q and the drops
                          "train/drop_exec_frac": float(executed), "train/drop_frac_audio": dropped[0],
                          "train/drop_frac_visual": dropped[1]}, label.shape[0])
            bar.set_postfix(loss=f"{loss.item():.3f}")
        metrics = run.train_metrics(optimizer)
        metrics["train/rescale"] = rescale_sum / n_exec if n_exec else 1.0  # ALGO LOGIC
        scheduler.step()

        model.eval()
        metrics.update(run_eval())
        run.end_epoch(epoch, metrics, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                       "scheduler": scheduler.state_dict(), "class_names": class_names,
                                       "opm_rng": opm_gen.get_state()})  # ALGO LOGIC: OPM's draw stream
    run.finish()
