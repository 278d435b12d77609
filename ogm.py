"""OGM / OGM-GE, On-the-fly Gradient Modulation (Peng et al., CVPR 2022; Wei et al., T-PAMI 2024): joint training,
plus at every step the dominance ratio of the two modalities' summed true-class probabilities gives the dominant
modality a coefficient k = 1 - tanh(alpha (rho - offset)); after backward its encoder's conv-kernel gradients are
multiplied by k and, with GE (the default), both encoders' conv gradients get Gaussian noise with the std of the
unscaled gradient. `--preset tpami` gives the journal release. Docs: docs/ogm.md.
"""

# ALGO LOGIC BLOCK: OGM-GE (CVPR 2022 paper, Eq. 8-10 and Sec. 3.3). Brings its imports (math, torch): copy it as is.
import math

import torch


@torch.no_grad()
def ogm_scores(z_a, z_v, label):
    """Eq. 8: s_m = sum over the batch of softmax(z_m)[y], no gradient. Returns the tensor [s_a, s_v]; when the
    batch is split over processes, sum it over them before `ogm_coefficients` (every process then agrees)."""
    s_a = torch.softmax(z_a, 1).gather(1, label[:, None]).sum()
    s_v = torch.softmax(z_v, 1).gather(1, label[:, None]).sum()
    return torch.stack([s_a, s_v])


def ogm_coefficients(s_a, s_v, alpha, ratio_offset=0.0, tie="audio"):
    """Eq. 9-10: (k_a, k_v, audio_dominant). The higher-scoring modality gets 1 - tanh(alpha (rho - offset)), the
    other 1; an exact tie (s_a == s_v) modulates `tie`: "audio" as the CVPR release, "visual" as the T-PAMI one."""
    rho_v = float(s_v) / float(s_a)
    if rho_v > 1 or (rho_v == 1 and tie == "visual"):
        return 1.0, 1.0 - math.tanh(alpha * (rho_v - ratio_offset)), False
    return 1.0 - math.tanh(alpha * (1.0 / rho_v - ratio_offset)), 1.0, True


def ogm_active(epoch, starts, ends, warmup_epochs=0):
    """Modulate only after the warm-up and inside the inclusive epoch window [starts, ends]."""
    return epoch >= warmup_epochs and starts <= epoch <= ends


def ge_noise(ge, target, audio_dominant):
    """(noise_a, noise_v): GE adds noise to both encoders (target "both") or only to the modulated one."""
    return ge and (target == "both" or audio_dominant), ge and (target == "both" or not audio_dominant)


def modulate_gradients(
    audio_net, visual_net, k_a, k_v, noise_a, noise_v, generator=None, std_source="unscaled", params="conv"
):
    """After backward: g <- k_m g (+ N(0, (std(g) + 1e-8)^2) if noise_m) for each encoder's conv-kernel gradients.

    Only parameters with a 4-D gradient (params="nonbias": any non-1-D gradient) are touched, so BatchNorm and the
    head never are; conv encoders: "conv" (the release), encoders without convolutions (MLPs): "nonbias". An encoder
    with no gradient of that kind raises ValueError instead of being left unmodulated. The std is that of the
    unscaled gradient (std_source="scaled": of k g), unbiased; fresh noise for every tensor from `generator`.
    """
    if params not in ("conv", "nonbias"):
        raise ValueError(f"modulate_gradients: params={params!r}; use 'conv' (4-D gradients) or 'nonbias' (non-1-D)")
    selected = []
    for name, encoder in (("audio_net", audio_net), ("visual_net", visual_net)):
        selected.append(
            [
                p.grad
                for p in encoder.parameters()
                if p.grad is not None and (p.grad.dim() == 4 if params == "conv" else p.grad.dim() >= 2)
            ]
        )
        if not selected[-1]:  # checked for both encoders before either is edited
            raise ValueError(
                f"modulate_gradients: params={params!r} selects no gradient of {name} (no "
                f"{'4-D' if params == 'conv' else 'non-1-D'} gradient; call it after backward(), and "
                "pass params='nonbias' for encoders without convolutions)"
            )
    for grads, k, noise in zip(selected, (k_a, k_v), (noise_a, noise_v)):
        for g in grads:  # edited in place (the same values as g * k + noise * std, without temporary copies)
            std = g.std() + 1e-8 if noise and std_source == "unscaled" else None
            g.mul_(k)
            if noise:
                std = g.std() + 1e-8 if std is None else std
                g.add_(torch.randn(g.shape, generator=generator, device=g.device, dtype=g.dtype).mul_(std))


# END ALGO LOGIC BLOCK

# isort: split
import random

import numpy as np
import torch.nn.functional as F
from tqdm import tqdm

from common import distributed, flags, runs, speed
from common.data import build_datasets, make_loaders, seed_epoch
from common.evaluate import evaluate
from common.models import AVClassifier, unimodal_logits

# per dataset, the optimisation (a flag left out takes its value here; sources in the script's docs page); the LR is
# multiplied by --lr-gamma at each 0-based epoch of lr_milestones
PRESETS = {
    "cremad": dict(optimizer="sgd", lr=1e-3, lr_milestones=[70], batch_size=64, epochs=100),
    "ks": dict(optimizer="sgd", lr=1e-3, lr_milestones=[70], batch_size=64, epochs=100),
    "vggsound": dict(optimizer="sgd", lr=1e-3, lr_milestones=[70], batch_size=64, epochs=100),
    "synthetic": dict(optimizer="sgd", lr=1e-2, lr_milestones=[8], batch_size=32, epochs=10),
}
# ALGO LOGIC: --preset cvpr trains with PRESETS (the CVPR release's); --preset tpami with the journal release's
TPAMI_PRESETS = {
    "cremad": dict(optimizer="adamw", lr=1e-3, lr_milestones=[20, 40, 60, 80], batch_size=32, epochs=100),
    "ks": dict(optimizer="adamw", lr=5e-5, lr_milestones=[40, 80], batch_size=32, epochs=100),
    "vggsound": dict(optimizer="adamw", lr=5e-5, lr_milestones=[40, 80], batch_size=32, epochs=100),
    "synthetic": dict(optimizer="sgd", lr=1e-2, lr_milestones=[8], batch_size=32, epochs=10),
}
# ALGO LOGIC: OGM's values per preset and dataset (sources in docs/ogm.md, Defaults). synthetic: the CREMA-D values,
# epochs scaled 100 -> 10 (window 0-50 -> 0-5, 0-80 -> 0-8, warm-up 6 -> 1)
OGM_PRESETS = {
    "cvpr": {
        "cremad": dict(alpha=0.8, modulation_starts=0, modulation_ends=50, warmup_epochs=0),
        "ks": dict(alpha=0.8, modulation_starts=0, modulation_ends=50, warmup_epochs=0),
        "vggsound": dict(alpha=0.1, modulation_starts=0, modulation_ends=50, warmup_epochs=0),
        "synthetic": dict(alpha=0.8, modulation_starts=0, modulation_ends=5, warmup_epochs=0),
    },
    "tpami": {
        "cremad": dict(alpha=2.6, modulation_starts=0, modulation_ends=80, warmup_epochs=6),
        "ks": dict(alpha=0.8, modulation_starts=0, modulation_ends=60, warmup_epochs=6),
        "vggsound": dict(alpha=0.8, modulation_starts=0, modulation_ends=60, warmup_epochs=6),
        "synthetic": dict(alpha=2.6, modulation_starts=0, modulation_ends=8, warmup_epochs=1),
    },
}


def parse_args(argv=None):
    p = flags.parser(__doc__, __file__)  # the shared flags: common/flags.py
    p.add_argument("--fusion", default="concat", choices=["concat", "sum", "gated"], help="fusion head")
    # ALGO LOGIC: OGM's flags (None: the value of OGM_PRESETS for --preset and the dataset)
    nonneg, epoch = flags.at_least(0), flags.at_least(0, int)
    p.add_argument("--preset", default="cvpr", choices=["cvpr", "tpami"], help="the CVPR 2022 or T-PAMI 2024 release")
    p.add_argument("--modulation", default="ogm_ge", choices=["none", "ogm", "ogm_ge"], help="ogm_ge = OGM plus GE")
    p.add_argument("--alpha", type=nonneg, default=None, help="modulation strength alpha")
    p.add_argument("--modulation-starts", type=epoch, default=None, help="first epoch of the modulation window")
    p.add_argument("--modulation-ends", type=epoch, default=None, help="last epoch (inclusive) of the window")
    p.add_argument("--warmup-epochs", type=epoch, default=None, help="epochs 0..N-1 are never modulated")
    p.add_argument("--tie-modulates", choices=["audio", "visual"], help="side modulated on a score tie")
    p.add_argument("--ratio-offset", type=flags.between(0, 1), default=0.0, help="k = 1 - tanh(alpha (rho - offset))")
    p.add_argument("--ge-std-source", default="unscaled", choices=["unscaled", "scaled"], help="std of g or of k g")
    p.add_argument("--ge-target", default="both", choices=["both", "dominant"], help="GE noise on both encoders or one")
    p.add_argument("--modulate-params", default="conv", choices=["conv", "nonbias"], help="4-D or all non-1-D grads")

    args = p.parse_args(argv)
    optimisation = TPAMI_PRESETS if args.preset == "tpami" else PRESETS
    flags.fill(args, {**optimisation[args.dataset], **OGM_PRESETS[args.preset][args.dataset]})
    args.tie_modulates = args.tie_modulates or {"cvpr": "audio", "tpami": "visual"}[args.preset]  # ALGO LOGIC
    if args.modulation_starts > args.modulation_ends:
        p.error(f"--modulation-starts {args.modulation_starts} is after --modulation-ends {args.modulation_ends}")
    if args.modulation != "ogm_ge" and (args.ge_target != "both" or args.ge_std_source != "unscaled"):
        p.error(f"--ge-target and --ge-std-source shape GE noise, which --modulation {args.modulation} does not add")
    return args


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
    # ALGO LOGIC: the GE noise has a stream of its own, the same in every process (data order and augmentation are
    # unchanged by it)
    noise_gen = torch.Generator(device=device).manual_seed(args.seed + 1_000_000)

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
        noise_gen.set_state(ckpt["noise_rng"])  # ALGO LOGIC
    for epoch in range(run.start_epoch, args.epochs):
        run.begin_epoch()
        model.train()
        seed_epoch(train_loader, args.seed * 100_003 + epoch)  # shuffle and augmentation: (seed, epoch) only
        window = ogm_active(epoch, args.modulation_starts, args.modulation_ends, args.warmup_epochs)  # ALGO LOGIC
        modulate = args.modulation != "none" and window  # ALGO LOGIC: the modulation window
        bar = tqdm(train_loader, desc=f"epoch {epoch}", leave=False, disable=args.no_progress)
        for step, (spec, frames, label) in enumerate(bar):
            if args.max_steps and step >= args.max_steps:
                break
            audio, visual, label = spec.unsqueeze(1).to(device), frames.to(device), label.to(device)

            f_a, f_v, z = train_forward(lambda m: m(audio, visual))
            z_a, z_v = unimodal_logits(model.head, f_a, f_v, bias="half")  # the head's per-modality logits
            loss = F.cross_entropy(z, label)
            logs = {"train/loss": loss.item(), **runs.branch_logs(z_a, z_v, label)}
            s = distributed.all_reduce_sum(ogm_scores(z_a, z_v, label))  # ALGO LOGIC: Eq. 8 over the global batch
            # ALGO LOGIC: Eq. 9-10 (the side modulated on an exact tie: the preset's release)
            k_a, k_v, audio_dominant = ogm_coefficients(s[0], s[1], args.alpha, args.ratio_offset, args.tie_modulates)

            optimizer.zero_grad()
            loss.backward()
            # under torchrun DDP has averaged the gradients in backward: the modulation edits synchronised ones
            if modulate:  # ALGO LOGIC: scale the dominant encoder's conv gradients and add GE noise
                noise = ge_noise(args.modulation == "ogm_ge", args.ge_target, audio_dominant)  # (noise_a, noise_v)
                std, params = args.ge_std_source, args.modulate_params
                modulate_gradients(model.audio_net, model.visual_net, k_a, k_v, *noise, noise_gen, std, params)
            else:
                k_a, k_v = 1.0, 1.0  # logged: the applied coefficient
            if args.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            optimizer.step()
            logs["train/ratio"] = (s[0] / s[1]).item()  # ALGO LOGIC: the global batch's ratio
            logs.update({"train/coeff_audio": k_a, "train/coeff_visual": k_v})  # ALGO LOGIC: the applied k
            logs["train/modulated_audio_frac"] = float(audio_dominant)  # ALGO LOGIC: the modulated side
            run.log_step(logs, label.shape[0])
            bar.set_postfix(loss=f"{loss.item():.3f}")
        metrics = run.train_metrics(optimizer)
        scheduler.step()
        distributed.broadcast_buffers(model)  # torchrun: rank 0's BatchNorm statistics in every process

        model.eval()
        metrics.update(run_eval())
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
        state["noise_rng"] = noise_gen.get_state()  # ALGO LOGIC: the GE noise stream
        if run.end_epoch(epoch, metrics, {**state, "class_names": class_names}):  # --stop-after-epochs
            break
    run.finish()
