"""MMPareto (Wei, Hu, ICML 2024): the fused loss plus one unimodal loss per modality through two extra Linear heads on
the pooled features. On each encoder the fused-loss gradient g_m and its unimodal-loss gradient g_u are combined with
the plain-sum weights 1/2 when the whole-encoder cosine is positive, with the two-task min-norm (MGDA) weights when it
is not, then rescaled tensor by tensor to at least the plain sum's norm, times gamma = 1.5. Heads keep their own loss's
gradient. Docs: docs/mmpareto.md.
"""

# ALGO LOGIC BLOCK: MMPareto (ICML 2024; the release's code/MMPareto.py L110-207). Brings its imports (torch): copy it
# as is.
import torch


def task_grads(loss, params, retain_graph=True):
    """The gradient of one loss on each of `params` (zeros where the loss does not reach), the graph kept for the next
    loss. MMPareto needs the three losses' gradients separately: g_m = grad L_m, g_a = grad L_a, g_v = grad L_v."""
    grads = torch.autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def global_mean_grads(grad_lists, batch_size, reduce=lambda t: t):
    """Each process's batch-mean gradients -> the global batch's, sum_r n_r g_r / sum_r n_r, for every list.

    `reduce` sums a tensor over processes when the batch is split (DDP, e.g. all_reduce_sum); identity in one process,
    where the gradients come back unchanged (bitwise: the weight n / n is exactly 1). The combination below is not
    linear in the gradients (weights and norms come from dot products), so it must see the global batch's gradients,
    not each process's: then every process computes the same weights and applies the same update.
    """
    first = grad_lists[0][0]
    total = reduce(first.new_tensor([float(batch_size)]))
    w = float(batch_size) / float(total[0])
    flat = reduce(torch.cat([g.reshape(-1) for gl in grad_lists for g in gl]) * w)
    out, i = [], 0
    for gl in grad_lists:
        new = []
        for g in gl:
            new.append(flat[i : i + g.numel()].view_as(g))
            i += g.numel()
        out.append(new)
    return out


def min_norm_weight(p, q, r):
    """The two-task min-norm point (MGDA; the release's min_norm_solvers.py L9-30): the weight alpha of G_m in
    argmin_alpha ||alpha G_m + (1 - alpha) G_u||, from p = G_m.G_m, q = G_m.G_u, r = G_u.G_u:
    alpha = (r - q) / (p + r - 2 q), and the solver's end points 0.999 when q >= p and 0.001 when q >= r."""
    if q >= p:
        return 0.999
    if q >= r:
        return 0.001
    return (r - q) / (p + r - 2 * q)


def mmpareto_weights(g_m, g_u, combine="mmpareto"):
    """(alpha_m, cos): the weight of the fused-loss gradient and the cosine of the whole-encoder vectors G_m, G_u
    (every tensor of the encoder flattened and concatenated, BatchNorm included; release L126-150).

    mmpareto (release L165-174): alpha_m = 1/2 when cos > 0 (no conflict), else the min-norm weight; mgda (the paper's
    "conventional Pareto" ablation): the min-norm weight at every step. Computed in the gradients' dtype.
    """
    p = sum((a * a).sum() for a in g_m)
    q = sum((a * b).sum() for a, b in zip(g_m, g_u))
    r = sum((b * b).sum() for b in g_u)
    cos = q / torch.sqrt(torch.clamp(p * r, min=1e-16))  # F.cosine_similarity's eps; only its sign is used
    if combine == "mmpareto" and q > 0:  # q > 0 exactly when cos > 0
        return 0.5, cos
    return min_norm_weight(p, q, r), cos


def mmpareto_combine(g_m, g_u, alpha_m, gamma=1.5, rescale="tensor"):
    """The encoder's new gradient (release L184-207), one tensor per parameter:

        n_t = 2 alpha_m g_m,t + 2 (1 - alpha_m) g_u,t          (= g_m,t + g_u,t when alpha_m = 1/2)
        rho_t = ||g_m,t + g_u,t|| / ||n_t||                     (the plain sum's norm over n_t's)
        grad_t = gamma rho_t n_t if rho_t > 1 else gamma n_t   (norm gamma max(||g_m,t + g_u,t||, ||n_t||))

    tensor by tensor (rescale="tensor", the release) or with one rho from the whole-encoder norms ("global"). A zero
    n_t gives a zero gradient (the release: NaN when the plain sum is not zero). Returns (grads, mean of max(rho, 1)).
    """
    c_m, c_u = 2 * alpha_m, 2 * (1 - alpha_m)
    new = [c_m * a + c_u * b for a, b in zip(g_m, g_u)]
    sums = [torch.linalg.vector_norm(a + b) for a, b in zip(g_m, g_u)]
    norms = [torch.linalg.vector_norm(n) for n in new]
    if rescale == "global":
        total_n = torch.linalg.vector_norm(torch.stack(norms))
        rho = torch.linalg.vector_norm(torch.stack(sums)) / total_n if total_n > 0 else None
        rhos = [rho] * len(new)
    else:
        rhos = [s / n if n > 0 else None for s, n in zip(sums, norms)]
    out, scales = [], []
    for n, rho in zip(new, rhos):
        if rho is None:  # n_t = 0 (a zero gradient, or both zero): nothing to rescale
            out.append(torch.zeros_like(n))
            scales.append(1.0)
        elif rho > 1:
            out.append(rho * n * gamma)
            scales.append(float(rho))
        else:
            out.append(n * gamma)
            scales.append(1.0)
    return out, sum(scales) / max(len(scales), 1)


def mmpareto_encoder_grads(g_m, g_u, gamma=1.5, rescale="tensor", combine="mmpareto"):
    """One encoder's gradient from its fused-loss and unimodal-loss gradients; returns (grads, stats).

    combine: mmpareto (the method); uniform (the plain sum g_m + g_u, the release's uniform_baseline.py); mgda
    (min-norm weights alpha g_m + (1 - alpha) g_u every step, no rescale). stats: alpha_m, cos, conflict (cos <= 0),
    rescale (the mean of max(rho_t, 1)); for uniform alpha_m = 1/2 and rescale 1.
    """
    if combine not in ("mmpareto", "uniform", "mgda") or rescale not in ("tensor", "global"):
        raise ValueError(f"combine must be mmpareto, uniform or mgda, rescale tensor or global: {combine}, {rescale}")
    alpha_m, cos = mmpareto_weights(g_m, g_u, "mgda" if combine == "mgda" else "mmpareto")
    stats = {"alpha_m": float(alpha_m), "cos": float(cos), "conflict": float(cos <= 0), "rescale": 1.0}
    if combine == "uniform":
        stats["alpha_m"] = 0.5
        return [a + b for a, b in zip(g_m, g_u)], stats
    if combine == "mgda":
        return [alpha_m * a + (1 - alpha_m) * b for a, b in zip(g_m, g_u)], stats
    grads, stats["rescale"] = mmpareto_combine(g_m, g_u, alpha_m, gamma, rescale)
    return grads, stats


def set_grads(params, grads):
    """p.grad <- g for each pair (replacing whatever backward left there), before optimizer.step()."""
    for p, g in zip(params, grads):
        p.grad = g.detach()


# END ALGO LOGIC BLOCK

# isort: split
import random

import numpy as np
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from common import distributed, flags, runs, speed
from common.data import build_datasets, make_loaders, seed_epoch
from common.evaluate import evaluate
from common.models import AVClassifier, init_weights

# per dataset, the optimisation (a flag left out takes its value here; sources in the script's docs page); the LR is
# multiplied by --lr-gamma at each 0-based epoch of lr_milestones
# ALGO LOGIC: MMPareto.py L28-34, L296, L301: SGD 2e-3, batch 64, 50 epochs; its StepLR(30) is built and never stepped,
# so the LR stays 2e-3 (KS, VGGSound: no release loader, the same values); synthetic: baseline.py's
PRESETS = {
    "cremad": dict(optimizer="sgd", lr=2e-3, lr_milestones=[], batch_size=64, epochs=50),
    "ks": dict(optimizer="sgd", lr=2e-3, lr_milestones=[], batch_size=64, epochs=50),
    "vggsound": dict(optimizer="sgd", lr=2e-3, lr_milestones=[], batch_size=64, epochs=50),
    "synthetic": dict(optimizer="sgd", lr=1e-2, lr_milestones=[8], batch_size=32, epochs=10),
}
# ALGO LOGIC: MMPareto's values per dataset (docs/mmpareto.md, Defaults): gamma 1.5 hard-coded (MMPareto.py L178)
MMPARETO_PRESETS = {d: dict(gamma=1.5) for d in ("cremad", "ks", "vggsound", "synthetic")}


def parse_args(argv=None):
    p = flags.parser(__doc__, __file__)  # the shared flags: common/flags.py
    p.add_argument("--fusion", default="concat", choices=["concat", "sum", "film", "gated"], help="fusion head")
    # ALGO LOGIC: MMPareto's flags (None: the value of MMPARETO_PRESETS for the dataset)
    p.add_argument("--gamma", type=flags.positive(), default=None, help="encoder gradients x gamma (release 1.5)")
    p.add_argument(
        "--rescale", default="tensor", choices=["tensor", "global"], help="magnitude rescale per tensor or not"
    )
    p.add_argument(
        "--combine", default="mmpareto", choices=["mmpareto", "uniform", "mgda"], help="ablations: sum, MGDA"
    )
    p.add_argument(
        "--init", default="release", choices=["release", "shared"], help="release's or docs/models.md's init"
    )

    args = p.parse_args(argv)
    if args.combine != "mmpareto" and (args.gamma is not None or args.rescale != "tensor"):
        p.error(f"--gamma and --rescale shape MMPareto's combination, which --combine {args.combine} does not use")
    return flags.fill(args, {**PRESETS[args.dataset], **MMPARETO_PRESETS[args.dataset]})


ROLES = ["audio_net", "visual_net", "head", "head_audio", "head_visual"]  # parameter groups, in this order
# logged per encoder: train/coeff_* = alpha_m (1/2 without conflict), the cosine, the conflict steps, mean max(rho_t, 1)
LOGGED = [("coeff", "alpha_m"), ("cos", "cos"), ("conflict_frac", "conflict"), ("rescale", "rescale")]


def add_unimodal_heads(model, num_classes, init):  # ALGO LOGIC
    """ALGO LOGIC: the two extra Linear(512, C) heads on the pooled features (models.py L155-156, L184-207). init
    "release": no re-initialiser (MMPareto.py L278): BN weights N(1, 0.02) (backbone.py L104-109), every Linear
    PyTorch's default; "shared": docs/models.md's initialiser, as AVClassifier applies it."""
    model.head_audio, model.head_visual = nn.Linear(512, num_classes), nn.Linear(512, num_classes)
    if init == "shared":
        init_weights(model.head_audio)
        init_weights(model.head_visual)
        return model
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, mean=1.0, std=0.02)
        elif isinstance(m, nn.Linear):
            m.reset_parameters()
    return model


def forward(model, audio, visual):  # ALGO LOGIC
    """ALGO LOGIC: one forward pass: pooled features a, v, fused logits z and the separate heads' z_a, z_v."""
    a, v = model.audio_net(audio), model.visual_net(visual)
    return a, v, model.head(a, v)[2], model.head_audio(a), model.head_visual(v)


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
    model = AVClassifier(num_classes, args.fusion, train_set.frontend)
    model = add_unimodal_heads(model, num_classes, args.init).to(device)  # ALGO LOGIC
    if args.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), args.lr, momentum=0.9, weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, args.lr_milestones, args.lr_gamma)
    # ALGO LOGIC: three gradients per step, which DDP cannot follow: global_mean_grads averages them over processes
    train_forward = distributed.ddp(speed.train_forward(model, args), args, enabled=False)
    groups = [list(getattr(model, role).parameters()) for role in ROLES]  # ALGO LOGIC
    enc_a, enc_v, head, h_a, h_v = groups  # ALGO LOGIC
    na, nv, params = len(enc_a), len(enc_v), sum(groups, [])  # ALGO LOGIC
    how = (args.gamma, args.rescale, args.combine)  # ALGO LOGIC

    def eval_logits(audio, visual):
        return forward(model, audio, visual)[2:]  # ALGO LOGIC: unimodal accuracy from the separate heads

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

            a, v, z, z_a, z_v = train_forward(lambda m: forward(m, audio, visual))  # ALGO LOGIC: one forward
            loss_m, loss_a, loss_v = (F.cross_entropy(x, label) for x in (z, z_a, z_v))  # ALGO LOGIC
            loss = loss_m + loss_a + loss_v  # ALGO LOGIC: the logged loss (MMPareto.py L180)
            logs = {"train/loss": loss.item(), **runs.branch_logs(z_a, z_v, label)}

            # MMPareto: the three losses' gradients, each on the parameters it reaches; torchrun: the global batch's
            g_m = task_grads(loss_m, enc_a + enc_v + head)  # ALGO LOGIC
            g_a = task_grads(loss_a, enc_a + h_a)  # ALGO LOGIC
            g_v = task_grads(loss_v, enc_v + h_v, retain_graph=False)  # ALGO LOGIC
            g_m, g_a, g_v = global_mean_grads([g_m, g_a, g_v], label.shape[0], distributed.all_reduce_sum)  # ALGO LOGIC
            new_a, st_a = mmpareto_encoder_grads(g_m[:na], g_a[:na], *how)  # ALGO LOGIC: the audio encoder's
            new_v, st_v = mmpareto_encoder_grads(g_m[na : na + nv], g_v[:nv], *how)  # ALGO LOGIC: the visual one's
            optimizer.zero_grad()
            heads = g_m[na + nv :] + g_a[na:] + g_v[nv:]  # ALGO LOGIC: each head keeps its own loss's gradient
            set_grads(params, new_a + new_v + heads)  # ALGO LOGIC
            if args.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            optimizer.step()
            for m, st in (("audio", st_a), ("visual", st_v)):  # ALGO LOGIC
                logs.update({f"train/{k}_{m}": st[s] for k, s in LOGGED})  # ALGO LOGIC
            logs["train/loss_fused"] = loss_m.item()  # ALGO LOGIC
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
