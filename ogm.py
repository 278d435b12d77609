# docs and experiment results: docs/ogm.md
"""OGM / OGM-GE, On-the-fly Gradient Modulation (Peng et al., CVPR 2022; Wei et al., T-PAMI 2024).

Joint training, plus: at every step the dominance ratio of the two modalities' summed true-class probabilities
(half-bias unimodal logits of the fused head) gives the dominant modality a coefficient k = 1 - tanh(alpha * rho);
after backward its encoder's conv-kernel gradients are multiplied by k, and with GE (the default) both encoders'
conv gradients get Gaussian noise with the std of the unscaled gradient. `--preset tpami` gives the journal release.
"""

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


# ALGO LOGIC BLOCK: OGM-GE (CVPR 2022 paper, Eq. 8-10 and Sec. 3.3). Needs only `math` and `torch`: copy it as is.
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


def modulate_gradients(audio_net, visual_net, k_a, k_v, noise_a, noise_v, generator=None, std_source="unscaled",
                       params="conv"):
    """After backward: g <- k_m g (+ N(0, (std(g) + 1e-8)^2) if noise_m) for each encoder's conv-kernel gradients.

    Only parameters with a 4-D gradient (params="nonbias": any non-1-D gradient) are touched, so BatchNorm and the
    head never are. The std is that of the unscaled gradient (std_source="scaled": of k g), unbiased; fresh noise
    for every tensor from `generator`.
    """
    for encoder, k, noise in ((audio_net, k_a, noise_a), (visual_net, k_v, noise_v)):
        for p in encoder.parameters():
            if p.grad is None or (p.grad.dim() != 4 if params == "conv" else p.grad.dim() < 2):
                continue
            g = p.grad  # edited in place (the same values as g * k + noise * std, without temporary copies)
            std = g.std() + 1e-8 if noise and std_source == "unscaled" else None
            g.mul_(k)
            if noise:
                std = g.std() + 1e-8 if std is None else std
                g.add_(torch.randn(g.shape, generator=generator, device=g.device, dtype=g.dtype).mul_(std))
# END ALGO LOGIC BLOCK


# optimisation settings per dataset (None in a flag = take it from here); milestones are the 0-based epochs at which
# the LR is multiplied by --lr-gamma. ALGO LOGIC: one table per --preset, sources in docs/ogm.md (Defaults).
# cvpr: the CVPR release. tpami: the journal release. synthetic: baseline.py's optimisation with the CREMA-D
# method values, epoch counts scaled 100 -> 10 (window 0-50 -> 0-5, 0-80 -> 0-8, warm-up 6 -> 1).
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
    p = runs.make_parser(__doc__, __file__)
    # Algorithm specific arguments
    p.add_argument("--preset", default="cvpr", choices=sorted(PRESETS),
                   help="cvpr = the CVPR 2022 release; tpami = the T-PAMI 2024 release")
    p.add_argument("--modulation", default="ogm_ge", choices=["none", "ogm", "ogm_ge"],
                   help="ogm_ge = OGM plus GE noise")
    p.add_argument("--alpha", type=float, default=None, help="modulation strength alpha (default: preset)")
    p.add_argument("--modulation-starts", type=int, default=None,
                   help="first epoch (0-based) of the modulation window (default: preset)")
    p.add_argument("--modulation-ends", type=int, default=None,
                   help="last epoch (inclusive) of the modulation window (default: preset)")
    p.add_argument("--warmup-epochs", type=int, default=None,
                   help="epochs 0..N-1 are never modulated (default: cvpr 0, tpami 6)")
    p.add_argument("--tie-modulates", default=None, choices=["audio", "visual"],
                   help="the side modulated on an exact score tie (default: cvpr audio, tpami visual, as the releases)")
    p.add_argument("--ratio-offset", type=float, default=0.0,
                   help="k = 1 - tanh(alpha (rho - offset)); 1 = the continuous variant")
    p.add_argument("--ge-std-source", default="unscaled", choices=["unscaled", "scaled"],
                   help="GE noise std from the gradient before or after k")
    p.add_argument("--ge-target", default="both", choices=["both", "dominant"],
                   help="GE noise on both encoders (release) or the modulated one (extension)")
    p.add_argument("--modulate-params", default="conv", choices=["conv", "nonbias"],
                   help="conv = 4-D gradients; nonbias = every non-1-D encoder gradient")
    p.add_argument("--unimodal-logits", default="split", choices=["split", "self-gate"],
                   help="split = slice the head (concat, sum); self-gate = gated head, each modality gates itself")
    return p.parse_args(argv)


def check_args(args):
    """Valid ranges of OGM's flags and their impossible combinations (after the preset): one line naming the flag."""
    runs.check(args, "alpha", lambda x: x >= 0, ">= 0 (below 0, k > 1 would amplify the dominant modality)")
    for name in ("modulation_starts", "modulation_ends", "warmup_epochs"):
        runs.check(args, name, lambda x: x >= 0, ">= 0 (0-based epochs)")
    runs.check(args, "ratio_offset", lambda x: 0 <= x <= 1, "in [0, 1] (above 1, k > 1 would amplify the dominant one)")
    if args.modulation_starts > args.modulation_ends:
        raise SystemExit(f"--modulation-starts {args.modulation_starts} is after --modulation-ends "
                         f"{args.modulation_ends}: the modulation window is empty")
    if args.modulation != "ogm_ge" and (args.ge_target != "both" or args.ge_std_source != "unscaled"):
        raise SystemExit(f"--ge-target and --ge-std-source shape the GE noise, which --modulation {args.modulation} "
                         "does not add: use --modulation ogm_ge or drop them")
    if args.unimodal_logits == "self-gate" and args.fusion != "gated":
        raise SystemExit(f"--unimodal-logits self-gate reads the gated head, not --fusion {args.fusion}: add "
                         "--fusion gated or drop it")


def check_fusion(fusion, unimodal):
    """OGM needs per-modality logits: concat and sum split exactly; gated only with the self-gate extension."""
    if fusion == "film" or (fusion == "gated" and unimodal != "self-gate"):
        raise SystemExit(f"--fusion {fusion}: the head cannot be split into unimodal logits for OGM's scores "
                         "(docs/models.md; the official code crashes here). Use --fusion concat or sum, or "
                         "--fusion gated --unimodal-logits self-gate.")


if __name__ == "__main__":
    args = parse_args()
    args, ckpt = runs.setup(args, PRESETS[args.preset])  # ALGO LOGIC: the table of --preset
    args.tie_modulates = args.tie_modulates or {"cvpr": "audio", "tpami": "visual"}[args.preset]  # ALGO LOGIC
    check_fusion(args.fusion, args.unimodal_logits)  # ALGO LOGIC: film/gated have no unimodal split
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
    noise_gen = torch.Generator(device=device)  # ALGO LOGIC: GE noise has a stream of its own (data order and
    noise_gen.manual_seed(args.seed + 1_000_000)  # augmentation are unchanged by it), the same in every process

    def eval_logits(audio, visual):
        f_a, f_v, z = model(audio, visual)
        z_a, z_v = unimodal_logits(model.head, f_a, f_v, bias="half")
        return z, z_a, z_v

    def run_eval():
        return evaluate(eval_logits, test_loader, device, num_classes, args.eval_max_steps)

    if args.eval_only:
        runs.evaluate_checkpoint(args, ckpt, model, run_eval)
    run = runs.Run(args, ckpt, model, optimizer, scheduler)  # run folder, logs; --resume: restores the state
    if args.resume:
        noise_gen.set_state(ckpt["noise_rng"])  # ALGO LOGIC

    for epoch in range(run.start_epoch, args.epochs):
        run.begin_epoch()
        model.train()
        loader_gen.manual_seed(args.seed * 100_003 + epoch)  # shuffling and augmentation depend only on (seed, epoch)
        distributed.set_epoch(train_loader)  # torchrun: this process's shard and augmentation stream
        modulate = args.modulation != "none" and ogm_active(  # ALGO LOGIC: the modulation window
            epoch, args.modulation_starts, args.modulation_ends, args.warmup_epochs)
        bar = tqdm(train_loader, desc=f"epoch {epoch}", leave=False, disable=args.no_progress)
        for step, (spec, frames, label) in enumerate(bar):
            if args.max_steps and step >= args.max_steps:
                break
            audio, visual, label = spec.unsqueeze(1).to(device), frames.to(device), label.to(device)

            f_a, f_v, z = train_forward(lambda m: m(audio, visual))
            loss = F.cross_entropy(z, label)  # only the fused loss is back-propagated
            with torch.no_grad():  # monitoring only: unimodal losses
                z_a, z_v = unimodal_logits(model.head, f_a, f_v, bias="half")
                loss_a, loss_v = F.cross_entropy(z_a, label), F.cross_entropy(z_v, label)
            s = distributed.all_reduce_sum(ogm_scores(z_a, z_v, label))  # ALGO LOGIC: Eq. 8 over the global batch
            k_a, k_v, audio_dominant = ogm_coefficients(s[0], s[1], args.alpha, args.ratio_offset,  # ALGO LOGIC
                                                        args.tie_modulates)

            optimizer.zero_grad()
            loss.backward()  # under torchrun DDP averages the gradients here: the modulation edits synchronised ones
            if modulate:  # ALGO LOGIC: scale the dominant encoder's conv gradients; GE noise
                noise_a, noise_v = ge_noise(args.modulation == "ogm_ge", args.ge_target, audio_dominant)
                modulate_gradients(model.audio_net, model.visual_net, k_a, k_v, noise_a, noise_v, noise_gen,
                                   args.ge_std_source, args.modulate_params)
            else:
                k_a, k_v = 1.0, 1.0  # logged: the applied coefficient
            if args.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            optimizer.step()

            run.log_step({"train/loss": loss.item(), "train/loss_audio": loss_a.item(),
                          "train/loss_visual": loss_v.item(), "train/ratio": (s[0] / s[1]).item(),
                          "train/coeff_audio": k_a, "train/coeff_visual": k_v,  # ALGO LOGIC: OGM's k, the side
                          "train/modulated_audio_frac": float(audio_dominant)}, label.shape[0])
            bar.set_postfix(loss=f"{loss.item():.3f}")
        metrics = run.train_metrics(optimizer)
        scheduler.step()

        model.eval()
        metrics.update(run_eval())
        run.end_epoch(epoch, metrics, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                       "scheduler": scheduler.state_dict(), "class_names": class_names,
                                       "noise_rng": noise_gen.get_state()})  # ALGO LOGIC: the GE noise stream
    run.finish()
