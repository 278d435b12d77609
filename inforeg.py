"""InfoReg, Information Acquisition Regulation (Huang, Wei, Yang, Hu, CVPR 2025): joint training, plus, while an
encoder is in its "prime learning window" (its information measure, the trace of the Fisher information estimated
from the epoch's squared conv-kernel gradients, still growing fast), a proximal pull (alpha/2)||theta - theta_bar||^2
towards its weights at the start of the epoch on the modality whose unimodal logits score higher, alpha growing with
the score gap. Default: the paper's InfoReg (fused loss, alpha = exp(0.9 tanh gap)); `--variant release` gives the
release's InfoReg* (unimodal losses, 0.95 / 0.1 exp(tanh gap), audio-only 10-epoch window). Docs: docs/inforeg.md.
"""

# ALGO LOGIC BLOCK: InfoReg (CVPR 2025 paper, Eq. 7-16, Algorithm 1; the release's main.py). Brings its imports
# (math, torch, nn, F): copy it as is.
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def inforeg_loss(z, z_a, z_v, label, unimodal=False):
    """(L, L_m): L = CE(z) (the paper's InfoReg, Table 2) or, unimodal=True, CE(z) + CE(z_a) + CE(z_v) (InfoReg*,
    Table 3, what the release trains)."""
    loss_m = F.cross_entropy(z, label)
    if unimodal:
        return loss_m + F.cross_entropy(z_a, label) + F.cross_entropy(z_v, label), loss_m
    return loss_m, loss_m


@torch.no_grad()
def inforeg_scores(z_a, z_v, label, reduce=lambda t: t):
    """Eq. 8 as the release computes it: s_m = sum over the batch of softmax(z_m)[y]. Returns the tensor
    [s_a, s_v, n] (n samples); `reduce` sums it over processes when the batch is split (DDP). Means: s_m / n."""
    s_a = torch.softmax(z_a, 1).gather(1, label[:, None]).sum()
    s_v = torch.softmax(z_v, 1).gather(1, label[:, None]).sum()
    return reduce(torch.stack([s_a, s_v, s_a.new_tensor(float(label.shape[0]))]))


def paper_window_open(trace, window_k=0.04):
    """Eq. 11 and Algorithm 1, from one modality's own traces T(0..t-1) at epoch t = len(trace): open when
    (T(t-1) - T(t-2)) / T(t-1) > K; never in epochs 0 and 1; closed when T(t-1) = 0."""
    if len(trace) < 2 or trace[-1] == 0:
        return False
    return (trace[-1] - trace[-2]) / trace[-1] > window_k


def paper_coefficients(s_a, s_v, open_a, open_v, beta=0.9):
    """Eq. 9-10 and 16, from mean scores: the leader m (s_m > s_other) gets alpha = exp(beta tanh(s_m - s_other))
    when its own window is open; the other modality, and a tie, 0. Returns (alpha_A, alpha_V)."""
    s_a, s_v = float(s_a), float(s_v)
    if s_a > s_v and open_a:
        return math.exp(beta * math.tanh(s_a - s_v)), 0.0
    if s_v > s_a and open_v:
        return 0.0, math.exp(beta * math.tanh(s_v - s_a))
    return 0.0, 0.0


def window_value(trace, length=10):
    """The release's window value at epoch e = len(trace), from the audio traces: 1 at e = 0; else, with
    H = [0]*length + trace, the relative growth of the `length`-epoch moving mean,
    (T(e-1) - T(e-1-length)) / sum_{j=e-length}^{e-1} T(j), T(j < 0) = 0; 0 when that sum is 0. Open while > K."""
    if len(trace) == 0:
        return 1.0
    h = [0.0] * length + [float(t) for t in trace]
    tr1, tr2 = sum(h[-length:]) / length, sum(h[-length - 1 : -1]) / length
    return (tr1 - tr2) / tr1 if tr1 != 0 else 0.0


def release_coefficients(s_a, s_v, k, window_k=0.05, beta_audio=0.95, beta_visual=0.1):
    """The release's strengths, from batch sums: while k > K the modality with the larger score gets
    beta_m exp(tanh(s_m - s_other)), the other 0; both 0 when closed and on a tie. Returns (beta_A, beta_V)."""
    s_a, s_v = float(s_a), float(s_v)
    if k > window_k and s_a > s_v:
        return beta_audio * math.exp(math.tanh(s_a - s_v)), 0.0
    if k > window_k and s_v > s_a:
        return 0.0, beta_visual * math.exp(math.tanh(s_v - s_a))
    return 0.0, 0.0


def snapshot(params):
    """The anchor theta_bar: detached copies of an encoder's parameters, taken before an epoch's first step."""
    return [p.detach().clone() for p in params]


@torch.no_grad()
def proximal_pull(params, anchor, beta):
    """Eq. 12 with beta held constant, after backward: g += beta (theta - theta_bar), the gradient of
    (beta/2)||theta - theta_bar||^2, on every parameter of the encoder (BatchNorm included)."""
    if beta == 0:  # nothing to add (saves a pass over the encoder)
        return
    for p, a in zip(params, anchor):
        if p.grad is not None:
            p.grad += beta * (p - a)


def fim_weights(encoder):
    """The weights the information measure reads: every Conv2d and Linear weight of the encoder (not BatchNorm)."""
    return [m.weight for m in encoder.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def fim_zeros(weights):
    """The accumulators F_l, zeroed at the start of every epoch."""
    return [torch.zeros_like(w) for w in weights]


@torch.no_grad()
def fim_accumulate(fim, weights):
    """F_l += g_l * g_l with g_l the step's final gradient (after the pull; under DDP after the averaging, so no
    reduction). A weight without a gradient is skipped."""
    for f, w in zip(fim, weights):
        if w.grad is not None:
            f.addcmul_(w.grad, w.grad)


def fim_trace(fim):
    """Eq. 7 as the release estimates it at an epoch's end: T = sum over layers of mean(F_l)."""
    return sum(f.mean().item() for f in fim)


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
# ALGO LOGIC: the release's main.py: SGD 2e-3, batch 64, 50 epochs, StepLR(30) stepped at each epoch's end
PRESETS = {
    "cremad": dict(optimizer="sgd", lr=2e-3, lr_milestones=[30], batch_size=64, epochs=50),
    "ks": dict(optimizer="sgd", lr=2e-3, lr_milestones=[30], batch_size=64, epochs=50),
    "vggsound": dict(optimizer="sgd", lr=2e-3, lr_milestones=[30], batch_size=64, epochs=50),
    "synthetic": dict(optimizer="sgd", lr=1e-2, lr_milestones=[8], batch_size=32, epochs=10),
}
# ALGO LOGIC: InfoReg's values per variant and dataset (docs/inforeg.md, Defaults). paper: beta 0.9, K 0.04 (Sec. 4.7),
# fused loss only (Table 2); release (main.py): 0.95 / 0.1, K 0.05, a 10-epoch mean of the audio trace, unimodal
# losses on; synthetic: the same, the 10-of-50-epoch mean scaled to 2 of 10 epochs
INFOREG_PRESETS = {
    "paper": {d: dict(beta=0.9, window_k=0.04, unimodal_loss="off") for d in ("cremad", "ks", "vggsound", "synthetic")},
    "release": {
        "cremad": dict(beta_audio=0.95, beta_visual=0.1, window_k=0.05, window_epochs=10, unimodal_loss="on"),
        "ks": dict(beta_audio=0.95, beta_visual=0.1, window_k=0.05, window_epochs=10, unimodal_loss="on"),
        "vggsound": dict(beta_audio=0.95, beta_visual=0.1, window_k=0.05, window_epochs=10, unimodal_loss="on"),
        "synthetic": dict(beta_audio=0.95, beta_visual=0.1, window_k=0.05, window_epochs=2, unimodal_loss="on"),
    },
}


def parse_args(argv=None):
    p = flags.parser(__doc__, __file__)  # the shared flags: common/flags.py
    p.add_argument("--fusion", default="concat", choices=["concat", "sum", "gated"], help="fusion head")
    # ALGO LOGIC: InfoReg's flags (None: the value of INFOREG_PRESETS for --variant and the dataset)
    nonneg = flags.at_least(0)
    p.add_argument(
        "--variant", default="paper", choices=["paper", "release"], help="the paper's InfoReg or the release"
    )
    p.add_argument("--beta", type=nonneg, default=None, help="paper: alpha = exp(beta tanh(score gap))")
    p.add_argument("--beta-audio", type=nonneg, default=None, help="release: audio strength c_A exp(tanh(gap))")
    p.add_argument("--beta-visual", type=nonneg, default=None, help="release: visual strength c_V exp(tanh(gap))")
    p.add_argument("--window-k", type=flags.between(0, 1), default=None, help="the window is open while growth > K")
    p.add_argument("--window-epochs", type=flags.positive(int), default=None, help="release: moving-mean length")
    p.add_argument("--unimodal-loss", default=None, choices=["on", "off"], help="on: CE(z) + CE(z_a) + CE(z_v)")

    args = p.parse_args(argv)
    other = {"paper": ("beta_audio", "beta_visual", "window_epochs"), "release": ("beta",)}[args.variant]
    for name in other:
        if getattr(args, name) is not None:
            p.error(f"--{name.replace('_', '-')} is a flag of the other variant, not of --variant {args.variant}")
    return flags.fill(args, {**PRESETS[args.dataset], **INFOREG_PRESETS[args.variant][args.dataset]})


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
        z_a, z_v = unimodal_logits(model.head, f_a, f_v, bias="half")
        return z, z_a, z_v

    def run_eval():
        return evaluate(eval_logits, test_loader, device, num_classes, args.eval_max_steps)

    if args.eval_only:  # print the checkpoint's test metrics, then exit
        runs.print_evaluation(args.checkpoint, ckpt, model, run_eval)
        raise SystemExit(0)
    run = runs.Run(args, ckpt, model, optimizer, scheduler, (train_set, test_set))  # run folder; --resume
    # ALGO LOGIC: the information measure of every epoch so far (the windows come from it), the encoders' parameters
    traces = ckpt["inforeg_traces"] if args.resume else {"audio": [], "visual": []}
    enc_a, enc_v = list(model.audio_net.parameters()), list(model.visual_net.parameters())
    fim_w_a, fim_w_v = fim_weights(model.audio_net), fim_weights(model.visual_net)

    for epoch in range(run.start_epoch, args.epochs):
        run.begin_epoch()
        # ALGO LOGIC: the epoch's windows, the anchors theta_bar (the weights now) and zeroed FIM accumulators
        k = window_value(traces["audio"], args.window_epochs) if args.variant == "release" else None
        open_a = paper_window_open(traces["audio"], args.window_k) if k is None else k > args.window_k
        open_v = paper_window_open(traces["visual"], args.window_k) if k is None else k > args.window_k
        anchor_a, anchor_v = snapshot(enc_a), snapshot(enc_v)
        fim_a, fim_v = fim_zeros(fim_w_a), fim_zeros(fim_w_v)

        model.train()
        seed_epoch(train_loader, args.seed * 100_003 + epoch)  # shuffle and augmentation: (seed, epoch) only
        bar = tqdm(train_loader, desc=f"epoch {epoch}", leave=False, disable=args.no_progress)
        for step, (spec, frames, label) in enumerate(bar):
            if args.max_steps and step >= args.max_steps:
                break
            audio, visual, label = spec.unsqueeze(1).to(device), frames.to(device), label.to(device)

            f_a, f_v, z = train_forward(lambda m: m(audio, visual))
            z_a, z_v = unimodal_logits(model.head, f_a, f_v, bias="half")  # the head's per-modality logits
            loss, loss_m = inforeg_loss(z, z_a, z_v, label, args.unimodal_loss == "on")  # ALGO LOGIC
            logs = {"train/loss": loss.item(), **runs.branch_logs(z_a, z_v, label)}
            s = inforeg_scores(z_a, z_v, label, distributed.all_reduce_sum)  # ALGO LOGIC: [s_a, s_v, n], global
            if k is not None:  # ALGO LOGIC: the release: batch sums, the audio window value k
                beta_a, beta_v = release_coefficients(s[0], s[1], k, args.window_k, args.beta_audio, args.beta_visual)
            else:  # ALGO LOGIC: the paper: batch means, each modality's own window
                beta_a, beta_v = paper_coefficients(s[0] / s[2], s[1] / s[2], open_a, open_v, args.beta)

            optimizer.zero_grad()
            loss.backward()
            # ALGO LOGIC: on the (DDP-averaged) gradient: the pull towards the anchor, then the squared gradients
            proximal_pull(enc_a, anchor_a, beta_a)
            proximal_pull(enc_v, anchor_v, beta_v)
            fim_accumulate(fim_a, fim_w_a)
            fim_accumulate(fim_v, fim_w_v)

            if args.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            optimizer.step()
            # ALGO LOGIC: the global batch's ratio and mean scores, the applied strengths (0: not pulled), the windows
            logs.update(
                {
                    "train/ratio": (s[0] / s[1]).item(),
                    "train/score_audio": (s[0] / s[2]).item(),
                    "train/score_visual": (s[1] / s[2]).item(),
                    "train/loss_fused": loss_m.item(),
                    "train/coeff_audio": beta_a,
                    "train/coeff_visual": beta_v,
                    "train/reg_frac_audio": float(beta_a > 0),
                    "train/reg_frac_visual": float(beta_v > 0),
                    "train/window_open_audio": float(open_a),
                    "train/window_open_visual": float(open_v),
                }
            )
            run.log_step(logs, label.shape[0])
            bar.set_postfix(loss=f"{loss.item():.3f}")
        metrics = run.train_metrics(optimizer)
        # ALGO LOGIC: the epoch's information measure (Eq. 7) of each encoder, and the release's window value
        traces["audio"].append(fim_trace(fim_a))
        traces["visual"].append(fim_trace(fim_v))
        metrics.update({"train/fim_trace_audio": traces["audio"][-1], "train/fim_trace_visual": traces["visual"][-1]})
        if k is not None:  # ALGO LOGIC
            metrics["train/window_k"] = k

        scheduler.step()
        distributed.broadcast_buffers(model)  # torchrun: rank 0's BatchNorm statistics in every process

        model.eval()
        metrics.update(run_eval())
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
        state["inforeg_traces"] = traces  # ALGO LOGIC: the windows of the next epochs come from them
        if run.end_epoch(epoch, metrics, {**state, "class_names": class_names}):  # --stop-after-epochs
            break
    run.finish()
