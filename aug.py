"""AUG: sustained boosting with adaptive classifier assignment (Jiang, Huang, Yang, NeurIPS 2025). No fusion head and
no fused loss: each modality has a list of classifiers q_j = h(ReLU(L_j u)) that share one output layer h; its output
is the sum of their logits. Every mini-batch makes two optimizer steps, audio then visual, each on that modality's
sustained-boosting loss (the newest classifier fits the residual of the previous ones). After epoch 0 and every
max(10, E // 10) epochs, adaptive classifier assignment (ACA) appends a classifier to the less confident modality.
Test-time fusion: z = 0.4 P_a + 0.6 P_v. Docs: docs/aug.md.
"""

# ALGO LOGIC BLOCK: AUG (NeurIPS 2025 paper): the classifiers, the boosting loss, the step and ACA.
# Brings its imports (torch, nn, F): copy it as is.
import torch
import torch.nn as nn
import torch.nn.functional as F


class AUGClassifier(nn.Module):
    """Roles: `audio_net`, `visual_net` (any encoders giving (B, dim) features), the per-modality lists of first
    layers `audio_classifiers` / `visual_classifiers` (L_j: dim -> hidden; [0] is the release's embedding_a /
    embedding_v), and `head` (h: hidden -> C), the one output layer shared by every classifier of both modalities.
    q_j = h(ReLU(L_j u)); P = sum_j q_j. dim: the encoders' feature width, or (audio width, visual width)."""

    def __init__(self, audio_net, visual_net, num_classes, dim=512, hidden=256):
        super().__init__()
        dim_a, dim_v = (dim, dim) if isinstance(dim, int) else dim
        self.audio_net, self.visual_net = audio_net, visual_net
        self.audio_classifiers = nn.ModuleList([nn.Linear(dim_a, hidden)])
        self.visual_classifiers = nn.ModuleList([nn.Linear(dim_v, hidden)])
        self.head = nn.Linear(hidden, num_classes)

    def classifiers(self, modality):
        if modality not in ("audio", "visual"):
            raise ValueError(f"AUGClassifier: modality {modality!r} selects no classifiers; use 'audio' or 'visual'")
        return self.audio_classifiers if modality == "audio" else self.visual_classifiers

    def classifier_logits(self, u, modality):
        """[q_1, ..., q_n] of `modality` for its pooled feature u (B, dim)."""
        return [self.head(F.relu(layer(u))) for layer in self.classifiers(modality)]


def add_classifier(model, modality, optimizer=None, sync=None):
    """Append a first layer (Xavier-normal weight, zero bias) to `modality`'s list. With an optimizer (the added
    classifiers train) it becomes a new param group at the current LR (same momentum and weight decay), so the
    schedule decays it too. sync(layer), if given, makes every process hold the same draw."""
    first = model.classifiers(modality)[0]
    layer = nn.Linear(first.in_features, first.out_features).to(first.weight.device)
    nn.init.xavier_normal_(layer.weight)
    nn.init.zeros_(layer.bias)
    if sync is not None:
        sync(layer)
    model.classifiers(modality).append(layer)
    if optimizer is not None:
        optimizer.add_param_group({"params": list(layer.parameters()), "lr": optimizer.param_groups[0]["lr"]})
    return layer


def true_class_prob(logits, label, source="ensemble"):
    """Per-sample score of a list of classifier logits at the true class: softmax(sum_j q_j)[y] (ensemble, the release)
    or sum_j softmax(q_j)[y] (sum-probs, the paper; can exceed 1)."""
    if source == "ensemble":
        return torch.softmax(sum(logits), 1).gather(1, label[:, None]).squeeze(1)
    return sum(torch.softmax(q, 1) for q in logits).gather(1, label[:, None]).squeeze(1)


def residual_weights(prev_logits, label, lam, source="ensemble"):
    """w_i = 1 - lam * sg(p_prev,i[y_i]): the residual label's one non-zero entry (at the true class; not
    renormalised)."""
    return 1.0 - lam * true_class_prob([q.detach() for q in prev_logits], label, source)


def residual_loss(prev_logits, newest, label, lam, source="ensemble"):
    """eps = mean_i[-w_i log softmax(q_t,i)[y_i]]: the newest classifier's CE against the residual label."""
    w = residual_weights(prev_logits, label, lam, source)
    return -(w * F.log_softmax(newest, 1).gather(1, label[:, None]).squeeze(1)).mean()


def boosting_loss(logits, label, lam, source="ensemble"):
    """Sustained boosting: CE(P_all, y) for one classifier; CE(P_all, y) + CE(P_prev, y) + eps for t >= 2."""
    loss = F.cross_entropy(sum(logits), label)
    if len(logits) == 1:
        return loss
    return loss + F.cross_entropy(sum(logits[:-1]), label) + residual_loss(logits[:-1], logits[-1], label, lam, source)


def aug_step(
    model,
    optimizer,
    audio,
    visual,
    label,
    lam,
    source="ensemble",
    clip_grad=0.0,
    zero_grad="pytorch1",
    forward=None,
    sync_grads=None,
):
    """One mini-batch: both encoders, an optimizer step on L_a, then one on L_v. The visual classifiers run only after
    the audio step, so they see the h it just updated. Returns {modality: {"loss": L_m, "ce": CE(P_m, y), "score":
    sum_i score_i}} (floats). zero_grad: "pytorch1" (the release on its PyTorch 1.11) or "pytorch2" (the released
    script on PyTorch 2). forward(fn) = fn(model) by default (e.g. under autocast); sync_grads(model), if given,
    follows each backward pass (with several processes: average the gradients, as DDP would; two optimizer steps per
    batch rule DDP out)."""
    out, forward = {}, forward or (lambda fn: fn(model))
    u = forward(lambda m: {"audio": m.audio_net(audio), "visual": m.visual_net(visual)})
    for modality in ("audio", "visual"):
        logits = forward(lambda m: m.classifier_logits(u[modality], modality))
        loss = boosting_loss(logits, label, lam, source)
        loss.backward()
        if sync_grads is not None:
            sync_grads(model)
        if clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        optimizer.step()
        # pytorch1 (zero_grad makes zero tensors): the audio gradients are zeroed, not deleted, so the visual step also
        # gives the audio side a momentum and weight-decay update; every gradient is deleted at the end of the batch,
        # so the audio step never moves the visual side. pytorch2 (zero_grad deletes): no step moves the other side
        model.zero_grad(set_to_none=not (zero_grad == "pytorch1" and modality == "audio"))
        with torch.no_grad():
            out[modality] = {
                "loss": loss.item(),
                "ce": F.cross_entropy(sum(logits), label).item(),
                "score": true_class_prob(logits, label, source).sum().item(),
            }
    return out


def merge_logits(p_a, p_v, alpha):
    """Test-time fusion of the two ensembles: z = alpha P_a + (1 - alpha) P_v."""
    return alpha * p_a + (1.0 - alpha) * p_v


def aca_check_period(epochs):
    """Epochs between ACA checks: the release's E // 10 (20 for CREMA-D's 200 epochs, 10 for KS's 100), but never
    fewer than 10, the paper's shortest period; a run of fewer than 100 epochs checks as the release's first 100 do."""
    return max(10, epochs // 10)


def is_check_epoch(epoch, check_every):
    """ACA runs after epoch 0 and after every 0-based epoch e with (e + 1) % check_every == 0."""
    return epoch == 0 or (epoch + 1) % check_every == 0


def aca_decision(s_a, s_v, sigma, tau, rule="ratio"):
    """+1: add a classifier to visual (audio is more confident), -1: add one to audio, 0: nothing.
    s_a, s_v are the epoch's mean scores; ratio (the release) compares s_a / s_v (= S_a / S_v) with sigma +- tau,
    difference (the paper) compares s_a - sigma s_v with +- tau."""
    if rule == "ratio":
        r = s_a / s_v if s_v > 0 else float("inf")
        return 1 if r > sigma + tau else -1 if r < sigma - tau else 0
    d = s_a - sigma * s_v
    return 1 if d > tau else -1 if d < -tau else 0


# END ALGO LOGIC BLOCK

# isort: split
import random

import numpy as np
from tqdm import tqdm

from common import distributed, flags, runs, speed
from common.data import build_datasets, make_loaders, seed_epoch
from common.evaluate import evaluate, macro_f1, mean_average_precision
from common.models import AudioEncoder, VisualEncoder, init_weights

# per dataset, the optimisation (a flag left out takes its value here; sources in the script's docs page); the LR is
# multiplied by --lr-gamma at each 0-based epoch of lr_milestones
# ALGO LOGIC: AUG's release: LR 1e-2 (10x the other methods), x0.1 from epoch 69 (and 139 on CREMA-D, 200 epochs);
# VGGSound batch 16 (paper); synthetic: baseline.py's, LR included
PRESETS = {
    "cremad": dict(optimizer="sgd", lr=1e-2, lr_milestones=[69, 139], batch_size=64, epochs=200),
    "ks": dict(optimizer="sgd", lr=1e-2, lr_milestones=[69], batch_size=64, epochs=100),
    "vggsound": dict(optimizer="sgd", lr=1e-2, lr_milestones=[69], batch_size=16, epochs=100),
    "synthetic": dict(optimizer="sgd", lr=1e-2, lr_milestones=[8], batch_size=32, epochs=10),
}
# ALGO LOGIC: AUG's values per dataset: the ACA period of the release, max(10, epochs // 10) (None: computed from
# --epochs); synthetic: scaled as the other methods' epoch counts (100 -> 10 epochs: every 10 epochs -> every epoch)
AUG_PRESETS = {"cremad": {}, "ks": {}, "vggsound": {}, "synthetic": dict(aca_check_every=1)}


def parse_args(argv=None):
    p = flags.parser(__doc__, __file__)  # the shared flags: common/flags.py (AUG has no fusion head: no --fusion)
    # ALGO LOGIC: AUG's flags
    share, nonneg = flags.between(0, 1), flags.at_least(0)
    p.add_argument("--lam-res", type=share, default=0.5, help="lambda of the residual label (earlier KS release: 0.2)")
    p.add_argument("--aca-sigma", type=nonneg, default=1.0, help="ACA centre sigma")
    p.add_argument("--aca-tau", type=nonneg, default=0.01, help="ACA dead zone tau")
    p.add_argument("--aca-check-every", type=flags.positive(int), help="ACA period (default: max(10, epochs // 10))")
    p.add_argument("--aca-rule", default="ratio", choices=["ratio", "difference"], help="the release's or the paper's")
    p.add_argument("--residual-source", default="ensemble", choices=["ensemble", "sum-probs"], help="release, paper")
    p.add_argument("--train-new-heads", action="store_true", help="train the added classifiers (the release does not)")
    p.add_argument("--max-classifiers", type=flags.at_least(0, int), default=0, help="per modality (0 = unlimited)")
    p.add_argument("--merge-alpha", type=share, default=0.4, help="audio weight a of the test fusion a P_a + (1-a) P_v")
    zg = ["pytorch1", "pytorch2"]
    p.add_argument("--zero-grad", default="pytorch1", choices=zg, help="zero_grad of PyTorch 1.11 (the release's) or 2")
    old = dict(dest="zero_grad", action="store_const", const="pytorch1")
    p.add_argument("--legacy-zero-grad", **old, help="old name of --zero-grad pytorch1")

    args = p.parse_args(argv)
    flags.fill(args, {**PRESETS[args.dataset], **AUG_PRESETS[args.dataset]})
    args.aca_check_every = args.aca_check_every or aca_check_period(args.epochs)  # ALGO LOGIC: max(10, E // 10)
    return args


def unimodal_metrics(test_logits, labels, num_classes):
    """Macro-F1 and mAP of each ensemble from the (P_a, P_v) recorded during evaluate()."""
    out = {}
    for i, modality in enumerate(("audio", "visual")):
        p = distributed.gather_in_order(torch.cat([t[i] for t in test_logits]), len(labels)).float()  # all processes
        y = labels[: len(p)]
        out[f"test/macro_f1_{modality}"] = macro_f1(p.argmax(1).numpy(), y, num_classes)
        out[f"test/map_{modality}"] = mean_average_precision(torch.softmax(p, 1).numpy(), y, num_classes)
    return out


if __name__ == "__main__":
    args, ckpt = runs.saved_run(parse_args())  # --resume / --eval-only: the saved run's settings
    distributed.init_process_group(args)  # torchrun: one process per device (no-op in a single process)
    if ckpt and "zero_grad" not in ckpt["args"]:  # a run saved before --zero-grad: --legacy-zero-grad or PyTorch 2's
        args.zero_grad = "pytorch1" if ckpt["args"].get("legacy_zero_grad") else "pytorch2"

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
    model = AUGClassifier(AudioEncoder(train_set.frontend), VisualEncoder(), num_classes)  # ALGO LOGIC: no fusion head
    init_weights(model)
    model = model.to(device)
    if args.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), args.lr, momentum=0.9, weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, args.lr_milestones, args.lr_gamma)
    # ALGO LOGIC: two optimizer steps per batch, which DDP cannot follow: aug_step averages the gradients (sync_grads)
    train_forward = distributed.ddp(speed.train_forward(model, args), args, enabled=False)

    test_labels = np.array([clip.label for clip in test_set.clips])  # the test loader is not shuffled
    test_logits = []  # ALGO LOGIC: (P_a, P_v) of each test batch, for the unimodal F1 and mAP

    def eval_logits(audio, visual):
        # ALGO LOGIC: each modality's ensemble logits P_m = sum_j q_j, fused z = alpha P_a + (1 - alpha) P_v
        p_a = sum(model.classifier_logits(model.audio_net(audio), "audio"))
        p_v = sum(model.classifier_logits(model.visual_net(visual), "visual"))
        test_logits.append((p_a.cpu(), p_v.cpu()))
        return merge_logits(p_a, p_v, args.merge_alpha), p_a, p_v

    def run_eval():
        test_logits.clear()
        metrics = evaluate(eval_logits, test_loader, device, num_classes, args.eval_max_steps)
        return {**metrics, **unimodal_metrics(test_logits, test_labels, num_classes)}

    def grow(modality, train):  # ALGO LOGIC: rank 0's draw in every process (their RNG streams differ)
        add_classifier(model, modality, optimizer if train else None, distributed.broadcast_module)

    added = list(ckpt["added"]) if ckpt else []  # ALGO LOGIC: rebuild the classifiers ACA added, in order
    for modality in added:
        grow(modality, args.train_new_heads and not args.eval_only)
    if args.eval_only:  # print the checkpoint's test metrics, then exit
        runs.print_evaluation(args.checkpoint, ckpt, model, run_eval)
        raise SystemExit(0)
    run = runs.Run(args, ckpt, model, optimizer, scheduler, (train_set, test_set), ties_to_later=True)  # ALGO LOGIC
    for epoch in range(run.start_epoch, args.epochs):
        run.begin_epoch()
        model.train()
        seed_epoch(train_loader, args.seed * 100_003 + epoch)  # shuffle and augmentation: (seed, epoch) only
        score = [0.0, 0.0, 0]  # ALGO LOGIC: S_a, S_v (the epoch's sums of true-class scores), samples
        bar = tqdm(train_loader, desc=f"epoch {epoch}", leave=False, disable=args.no_progress)
        for step, (spec, frames, label) in enumerate(bar):
            if args.max_steps and step >= args.max_steps:
                break
            audio, visual, label = spec.unsqueeze(1).to(device), frames.to(device), label.to(device)

            # ALGO LOGIC: an audio step on L_a, then a visual step on L_v (no fused loss); accumulate S_a and S_v
            step_args = (args.lam_res, args.residual_source, args.clip_grad, args.zero_grad)
            out = aug_step(model, optimizer, audio, visual, label, *step_args, train_forward, distributed.sync_grads)
            audio_out, visual_out = out["audio"], out["visual"]
            score = [score[0] + audio_out["score"], score[1] + visual_out["score"], score[2] + label.shape[0]]
            loss = audio_out["loss"] + visual_out["loss"]
            # the shared key train/coeff_<modality> holds each method's per-modality quantity: AUG's classifier count
            n_audio, n_visual = len(model.audio_classifiers), len(model.visual_classifiers)
            logs = {
                "train/loss": loss,
                "train/loss_audio": audio_out["loss"],
                "train/loss_visual": visual_out["loss"],
                "train/ce_audio": audio_out["ce"],
                "train/ce_visual": visual_out["ce"],
                "train/coeff_audio": float(n_audio),
                "train/coeff_visual": float(n_visual),
            }
            run.log_step(logs, label.shape[0])
            bar.set_postfix(loss=f"{loss:.3f}")
        metrics = run.train_metrics(optimizer)
        scheduler.step()
        distributed.broadcast_buffers(model)  # torchrun: rank 0's BatchNorm statistics in every process

        model.eval()
        metrics.update(run_eval())
        # ALGO LOGIC: ACA after the evaluation, at check epochs: add a classifier to the less confident modality
        s_sum_a, s_sum_v, n = distributed.all_reduce_sum(score)  # torchrun: over all processes
        s_a, s_v = s_sum_a / n, s_sum_v / n  # n >= 1: every epoch has a training step
        check = is_check_epoch(epoch, args.aca_check_every)
        action = aca_decision(s_a, s_v, args.aca_sigma, args.aca_tau, args.aca_rule) if check else 0
        weak = {1: "visual", -1: "audio"}.get(action)
        if weak and (epoch + 1 == args.epochs or 0 < args.max_classifiers <= len(model.classifiers(weak))):
            action, weak = 0, None  # after the last epoch it would never be trained or evaluated; or the cap is reached
        metrics.update({"train/score_audio": s_a, "train/score_visual": s_v, "train/ratio": s_a / max(s_v, 1e-12)})
        metrics["train/aca_action"] = float(action)
        # ALGO LOGIC: best.pt holds the model as evaluated, before ACA adds to it; last.pt (for --resume) has the new
        # classifier, which trains only with --train-new-heads
        evaluated = {"model": model.state_dict(), "class_names": class_names, "added": list(added)}
        if weak:
            grow(weak, args.train_new_heads)
            added.append(weak)
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
        if run.end_epoch(epoch, metrics, {**state, "class_names": class_names, "added": list(added)}, evaluated):
            break
    run.finish()
