# docs and experiment results: docs/aug.md
"""AUG: sustained boosting with adaptive classifier assignment (Jiang, Huang, Yang, NeurIPS 2025; spec: reference/aug.md).

No fusion head and no fused loss. Each modality has a list of classifiers q_j = h(ReLU(L_j u)) that share one output
layer h; its output is the sum of their logits. Every mini-batch makes two optimizer steps, audio then visual, each on
that modality's sustained-boosting loss (the newest classifier fits the residual of the previous ones). After epoch 0
and every E // 10 epochs, adaptive classifier assignment (ACA) appends a classifier to the less confident modality.
Test-time fusion: z = 0.4 P_a + 0.6 P_v. `diff baseline.py aug.py` shows it.
"""

import argparse
import contextlib
import os
import random
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from common import distributed
from common.data import DATASETS, add_data_args, build_datasets, make_loaders
from common.evaluate import evaluate, macro_f1, mean_average_precision
from common.models import AudioEncoder, VisualEncoder, init_weights
from common.utils import (RunLogger, apply_preset, capture_rng, format_metrics, load_checkpoint, make_run_dir,
                          merge_saved_args, restore_rng, run_name, save_checkpoint)

# official optimisation settings per dataset (None in a flag = take it from here); milestones are the 0-based
# epochs at which the effective LR is multiplied by lr_gamma (README of ../shared/reference, "Official defaults")
# ALGO LOGIC: AUG's release (aug.md section 5): LR 1e-2 (10x the other methods), x0.1 from epoch 69 (and 139 on CREMA-D,
# 200 epochs); VGGSound batch 16 [paper]. synthetic: baseline.py's optimisation unchanged, LR included (docs/aug.md).
PRESETS = {
    "cremad": dict(optimizer="sgd", lr=1e-2, lr_milestones=[69, 139], batch_size=64, epochs=200),
    "ks": dict(optimizer="sgd", lr=1e-2, lr_milestones=[69], batch_size=64, epochs=100),
    "vggsound": dict(optimizer="sgd", lr=1e-2, lr_milestones=[69], batch_size=16, epochs=100),
    "synthetic": dict(optimizer="sgd", lr=1e-2, lr_milestones=[8], batch_size=32, epochs=10),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--exp-name", default=os.path.basename(__file__)[: -len(".py")], help="name of this experiment")
    p.add_argument("--seed", type=int, default=0, help="seed of the experiment")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: per-dataset preset)")
    p.add_argument("--batch-size", type=int, default=None, help="mini-batch size (default: per-dataset preset)")
    p.add_argument("--optimizer", default=None, choices=["sgd", "adamw"], help="SGD (momentum 0.9, wd 1e-4) or AdamW (wd 0.01)")
    p.add_argument("--lr", type=float, default=None, help="base learning rate (default: per-dataset preset)")
    p.add_argument("--lr-milestones", type=int, nargs="*", default=None, help="0-based epochs where the LR is multiplied by --lr-gamma")
    p.add_argument("--lr-gamma", type=float, default=0.1, help="LR decay factor at each milestone")
    p.add_argument("--weight-decay", type=float, default=None, help="weight decay (default 1e-4 SGD, 0.01 AdamW)")
    p.add_argument("--clip-grad", type=float, default=0.0, help="max gradient norm (0 = no clipping)")
    p.add_argument("--max-steps", type=int, default=0, help="cap on training steps per epoch (0 = full epoch; for smoke tests)")
    p.add_argument("--eval-max-steps", type=int, default=0, help="cap on test batches (0 = the full test split)")
    p.add_argument("--runs-dir", default="runs", help="where run folders are written")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue the interrupted run in RUN_DIR from its last.pt")
    p.add_argument("--stop-after-epochs", type=int, default=0, help="exit after this many epochs in this process (time-limited jobs)")
    p.add_argument("--eval-only", action="store_true", help="evaluate --checkpoint on the test split and exit")
    p.add_argument("--checkpoint", default=None, help="checkpoint for --eval-only")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    # Algorithm specific arguments
    p.add_argument("--lam-res", type=float, default=0.5, help="lambda of the residual label (earlier KS release: 0.2)")
    p.add_argument("--aca-sigma", type=float, default=1.0, help="ACA centre sigma")
    p.add_argument("--aca-tau", type=float, default=0.01, help="ACA dead zone tau")
    p.add_argument("--aca-check-every", type=int, default=None,
                   help="ACA after epoch 0 and every N epochs (default: epochs // 10, at least 1)")
    p.add_argument("--aca-rule", default="ratio", choices=["ratio", "difference"],
                   help="ratio = release: s_a / s_v vs sigma +- tau; difference = paper: s_a - sigma s_v vs +- tau")
    p.add_argument("--residual-source", default="ensemble", choices=["ensemble", "sum-probs"],
                   help="p_prev and the confidence: softmax of the summed logits (release) or sum of softmaxes (paper)")
    p.add_argument("--train-new-heads", action="store_true",
                   help="train the added classifiers (paper figure); the release never gives them to the optimizer")
    p.add_argument("--max-classifiers", type=int, default=0, help="cap on classifiers per modality (0 = unlimited)")
    p.add_argument("--merge-alpha", type=float, default=0.4, help="audio weight of the test fusion a P_a + (1 - a) P_v")
    p.add_argument("--legacy-zero-grad", action="store_true",
                   help="zero gradients instead of None (PyTorch 1.11): the other modality gets momentum/weight-decay updates")
    add_data_args(p)
    distributed.add_speed_args(p)
    return p.parse_args(argv)


def make_optimizer(args, model):
    if args.optimizer == "sgd":
        wd = 1e-4 if args.weight_decay is None else args.weight_decay
        return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=wd)
    wd = 0.01 if args.weight_decay is None else args.weight_decay
    return torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=wd)


# ALGO LOGIC: AUG's model, loss, step and classifier assignment (aug.md sections 2-3)
class AUGClassifier(nn.Module):
    """Roles: `audio_net`, `visual_net`, the per-modality lists of first layers `audio_classifiers` /
    `visual_classifiers` (L_j: 512 -> 256; [0] is the release's embedding_a / embedding_v), and `head` (h: 256 -> C),
    the one output layer shared by every classifier of both modalities. q_j = h(ReLU(L_j u)); P = sum_j q_j."""

    def __init__(self, num_classes, hidden=256):
        super().__init__()
        self.audio_net = AudioEncoder()
        self.visual_net = VisualEncoder()
        self.audio_classifiers = nn.ModuleList([nn.Linear(512, hidden)])
        self.visual_classifiers = nn.ModuleList([nn.Linear(512, hidden)])
        self.head = nn.Linear(hidden, num_classes)
        init_weights(self)

    def classifiers(self, modality):
        return self.audio_classifiers if modality == "audio" else self.visual_classifiers

    def classifier_logits(self, u, modality):
        """[q_1, ..., q_n] of `modality` for its pooled feature u (B, 512)."""
        return [self.head(F.relu(layer(u))) for layer in self.classifiers(modality)]


def add_classifier(model, modality, optimizer=None):
    """Append a first layer (Xavier-normal weight, zero bias) to `modality`'s list. With an optimizer (--train-new-heads)
    it becomes a new param group at the current LR (same momentum and weight decay), so the schedule decays it too."""
    first = model.classifiers(modality)[0]
    layer = nn.Linear(first.in_features, first.out_features).to(first.weight.device)
    nn.init.xavier_normal_(layer.weight)
    nn.init.zeros_(layer.bias)
    distributed.broadcast_module(layer)  # torchrun: rank 0's draw in every process (their RNG streams differ)
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
    """w_i = 1 - lam * sg(p_prev,i[y_i]): the residual label's one non-zero entry (at the true class; not renormalised)."""
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


def aug_step(model, optimizer, audio, visual, label, args, train_model=None):
    """One mini-batch: both encoders, an optimizer step on L_a, then one on L_v. The visual classifiers run only after
    the audio step, so they see the h it just updated. Returns {modality: (L_m, CE(P_m, y), sum_i score_i)} (floats).
    `train_model(fn)` = fn(model) (common/distributed.py: autocast with --amp); under torchrun each backward pass is
    followed by an average of the gradients over the processes (two optimizer steps per batch: no DDP)."""
    out, run = {}, train_model or (lambda fn: fn(model))
    # --legacy-zero-grad: the audio step also moves visual parameters saved for the visual backward; keep the saved
    # pre-step copies, as the release's DataParallel replicas did (without it autograd raises an in-place error)
    with torch.autograd.graph.allow_mutation_on_saved_tensors() if args.legacy_zero_grad else contextlib.nullcontext():
        u = run(lambda m: {"audio": m.audio_net(audio), "visual": m.visual_net(visual)})
        for modality in ("audio", "visual"):
            logits = run(lambda m: m.classifier_logits(u[modality], modality))
            loss = boosting_loss(logits, label, args.lam_res, args.residual_source)
            loss.backward()
            distributed.sync_grads(model)  # torchrun: the average over processes, as DDP would (no-op in one process)
            if args.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            optimizer.step()
            model.zero_grad(set_to_none=not args.legacy_zero_grad)
            with torch.no_grad():
                out[modality] = (loss.item(), F.cross_entropy(sum(logits), label).item(),
                                 true_class_prob(logits, label, args.residual_source).sum().item())
    return out


def merge_logits(p_a, p_v, alpha):
    """Test-time fusion of the two ensembles: z = alpha P_a + (1 - alpha) P_v."""
    return alpha * p_a + (1.0 - alpha) * p_v


def aca_check_period(epochs):
    """The release's check period: E // 10 epochs (20 for CREMA-D's 200, 10 for KS's 100), at least 1."""
    return max(1, epochs // 10)


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
    args = apply_preset(parse_args(), PRESETS)
    ckpt = None
    if args.resume or args.eval_only:
        ckpt = load_checkpoint(os.path.join(args.resume, "last.pt") if args.resume else args.checkpoint)
        args = merge_saved_args(args, ckpt["args"])
    args.aca_check_every = args.aca_check_every or aca_check_period(args.epochs)  # ALGO LOGIC: E // 10
    script = os.path.basename(__file__)[: -len(".py")]

    distributed.init(args)  # torchrun: join the process group (no-op in a single process)

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    device = torch.device(args.device)

    # TRY NOT TO MODIFY: data, model, optimizer
    train_set, test_set, class_names = build_datasets(args)
    num_classes = len(class_names)
    args.num_workers = (0 if args.dataset == "synthetic" else 4) if args.num_workers is None else args.num_workers
    loader_gen = torch.Generator()
    train_loader, test_loader = make_loaders(train_set, test_set, args.batch_size, args.num_workers, loader_gen,
                                             args.pin_memory, args.persistent_workers)
    model = AUGClassifier(num_classes).to(device)
    optimizer = make_optimizer(args, model)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, args.lr_milestones, args.lr_gamma)
    train_model = distributed.wrap(model, args, ddp=False)  # --amp; torchrun: no DDP, aug_step averages gradients
    test_labels = np.array([clip.label for clip in test_set.clips])  # the test loader is not shuffled
    test_logits = []  # ALGO LOGIC: (P_a, P_v) of each test batch, for the unimodal F1 and mAP

    def logits_fn(audio, visual):
        # ALGO LOGIC: each modality's ensemble logits P_m = sum_j q_j, fused z = alpha P_a + (1 - alpha) P_v
        p_a = sum(model.classifier_logits(model.audio_net(audio), "audio"))
        p_v = sum(model.classifier_logits(model.visual_net(visual), "visual"))
        test_logits.append((p_a.cpu(), p_v.cpu()))
        return merge_logits(p_a, p_v, args.merge_alpha), p_a, p_v

    if args.eval_only:
        for modality in ckpt["added"]:  # ALGO LOGIC: rebuild the classifiers ACA added, then load their weights
            add_classifier(model, modality)
        model.load_state_dict(ckpt["model"])
        model.eval()
        metrics = evaluate(logits_fn, test_loader, device, num_classes, args.eval_max_steps)
        metrics.update(unimodal_metrics(test_logits, test_labels, num_classes))
        print(f"{args.checkpoint} (epoch {ckpt['epoch']}): {format_metrics(metrics)}")
        raise SystemExit(0)

    start_epoch, history, best, elapsed, added = 0, [], None, 0.0, []
    if args.resume:
        added = list(ckpt["added"])
        for modality in added:  # ALGO LOGIC: rebuild the added classifiers (and, if trained, their param groups) in order
            add_classifier(model, modality, optimizer if args.train_new_heads else None)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_epoch, history, best, elapsed = ckpt["epoch"] + 1, ckpt["history"], ckpt["best"], ckpt["elapsed"]
        restore_rng(ckpt["rng"])
        run_dir = args.resume
        print(f"resuming {run_dir} at epoch {start_epoch}")
    else:
        run_dir = make_run_dir(args.runs_dir, run_name(args, script))
    logger = RunLogger(run_dir, args, resume_epoch=start_epoch - 1 if args.resume else None)
    print(f"run folder: {run_dir}")

    epochs_this_process = 0
    for epoch in range(start_epoch, args.epochs):
        t0 = time.time()
        model.train()
        loader_gen.manual_seed(args.seed * 100_003 + epoch)  # shuffling and augmentation depend only on (seed, epoch)
        distributed.set_epoch(train_loader)  # torchrun: this process's shard and augmentation stream
        sums, n_steps, n_samples = {}, 0, 0
        score = {"audio": 0.0, "visual": 0.0}  # ALGO LOGIC: S_a, S_v, the epoch's running sums of true-class scores
        bar = tqdm(train_loader, desc=f"epoch {epoch}", leave=False, disable=args.no_progress)
        for step, (spec, frames, label) in enumerate(bar):
            if args.max_steps and step >= args.max_steps:
                break
            audio, visual, label = spec.unsqueeze(1).to(device), frames.to(device), label.to(device)

            # ALGO LOGIC: an audio step on L_a, then a visual step on L_v (no fused loss); accumulate S_a and S_v
            out = aug_step(model, optimizer, audio, visual, label, args, train_model)
            score["audio"], score["visual"] = score["audio"] + out["audio"][2], score["visual"] + out["visual"][2]
            loss = out["audio"][0] + out["visual"][0]

            stats = {"train/loss": loss, "train/loss_audio": out["audio"][0], "train/loss_visual": out["visual"][0],
                     "train/ce_audio": out["audio"][1], "train/ce_visual": out["visual"][1],
                     "train/coeff_audio": float(len(model.audio_classifiers)),
                     "train/coeff_visual": float(len(model.visual_classifiers))}
            distributed.trace_step(model, stats)  # no-op unless $BML_TRACE_DIR is set (tests, benchmark)
            for k, val in stats.items():
                sums[k] = sums.get(k, 0.0) + val
            n_steps, n_samples = n_steps + 1, n_samples + label.shape[0]
            bar.set_postfix(loss=f"{loss:.3f}")
        sums, n_samples = distributed.finish_epoch(model, sums, n_samples)  # torchrun: rank 0's BN buffers, global stats
        score["audio"], score["visual"] = distributed.all_reduce_sum([score["audio"], score["visual"]])  # ALGO LOGIC
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        train_time = time.time() - t0

        # TRY NOT TO MODIFY: evaluation, logging, checkpoints
        model.eval()
        metrics = {k: v / max(1, n_steps) for k, v in sums.items()}
        test_logits.clear()
        metrics.update(evaluate(logits_fn, test_loader, device, num_classes, args.eval_max_steps))
        metrics.update(unimodal_metrics(test_logits, test_labels, num_classes))
        # ALGO LOGIC: ACA after the evaluation, at check epochs: add a classifier to the less confident modality
        s_a, s_v = score["audio"] / max(1, n_samples), score["visual"] / max(1, n_samples)
        check = is_check_epoch(epoch, args.aca_check_every)
        action = aca_decision(s_a, s_v, args.aca_sigma, args.aca_tau, args.aca_rule) if check else 0
        weak = {1: "visual", -1: "audio"}.get(action)
        if weak and (epoch + 1 == args.epochs or 0 < args.max_classifiers <= len(model.classifiers(weak))):
            action, weak = 0, None  # after the last epoch it would never be trained or evaluated; or the cap is reached
        metrics.update({"train/score_audio": s_a, "train/score_visual": s_v, "train/ratio": s_a / max(s_v, 1e-12),
                        "train/aca_action": float(action)})
        metrics.update({"charts/lr": lr, "charts/samples_per_sec": n_samples / max(train_time, 1e-9),
                        "charts/epoch_time": time.time() - t0})
        history.append({"epoch": epoch, **metrics})
        logger.log_epoch(epoch, metrics)
        is_best = best is None or metrics["test/acc"] >= best["test/acc"]  # ALGO LOGIC: ties go to the later epoch
        best = {"epoch": epoch, **metrics} if is_best else best
        elapsed += time.time() - t0
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "epoch": epoch, "history": history, "best": best, "elapsed": elapsed, "rng": capture_rng(),
                 "args": vars(args), "class_names": class_names, "added": list(added)}
        if is_best:  # ALGO LOGIC: best.pt holds the model as evaluated, before ACA adds to it
            save_checkpoint(os.path.join(run_dir, "best.pt"), state)
        if weak:  # ALGO LOGIC: the new classifier is trained only with --train-new-heads; last.pt (for --resume) has it
            add_classifier(model, weak, optimizer if args.train_new_heads else None)
            added.append(weak)
            state.update(model=model.state_dict(), optimizer=optimizer.state_dict(), rng=capture_rng(), added=list(added))
        save_checkpoint(os.path.join(run_dir, "last.pt"), state)
        print(f"epoch {epoch}: {format_metrics(metrics)} ({metrics['charts/epoch_time']:.1f}s)")
        epochs_this_process += 1
        if args.stop_after_epochs and epochs_this_process >= args.stop_after_epochs and epoch + 1 < args.epochs:
            print(f"stopping after {epochs_this_process} epochs; continue with --resume {run_dir}")
            raise SystemExit(0)

    results = logger.finish(args, script, history, best, elapsed)
    print(f"best epoch {best['epoch']}: {format_metrics(best)}")
    print(f"last epoch: {format_metrics(results['last'])}")
    print(f"results: {os.path.join(run_dir, 'results.json')}")
