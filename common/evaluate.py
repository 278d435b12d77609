"""Evaluation on the full test split: fused, audio-only and visual-only accuracy, macro-F1, mAP."""

import numpy as np
import torch

from common.distributed import gather_in_order


def macro_f1(pred, target, num_classes):
    f1 = []
    for c in range(num_classes):
        tp = np.sum((pred == c) & (target == c))
        fp = np.sum((pred == c) & (target != c))
        fn = np.sum((pred != c) & (target == c))
        f1.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1))


def average_precision(scores, positives):
    """AP of one class as sklearn's average_precision_score defines it: sum over the distinct score thresholds of
    (recall step) x precision. Tied scores form one threshold, so their order does not matter."""
    if positives.sum() == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    s, hits = scores[order], positives[order]
    last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]  # the last rank of each group of equal scores
    tp = np.cumsum(hits)[last]
    precision, recall = tp / (last + 1), tp / hits.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def mean_average_precision(probs, target, num_classes):
    """Macro mAP from softmax(z) against one-hot labels, over the classes present in the test split."""
    aps = [average_precision(probs[:, c], (target == c).astype(np.float64)) for c in range(num_classes)]
    return float(np.nanmean(aps))


@torch.no_grad()
def evaluate(logits_fn, loader, device, num_classes, max_steps=0):
    """Run `logits_fn(audio (B,1,F,T), visual (B,3,T_f,H,W)) -> (z, z_a, z_v)` over the loader (z_a/z_v may be None).

    Returns test/acc, test/acc_audio, test/acc_visual, test/macro_f1, test/map (as fractions in [0, 1]).
    Under torchrun each process runs its shard and the metrics are computed over all of them, every clip once.
    """
    zs, zas, zvs, ys = [], [], [], []
    for step, (spec, frames, label) in enumerate(loader):
        if max_steps and step >= max_steps:
            break
        z, z_a, z_v = logits_fn(spec.unsqueeze(1).to(device), frames.to(device))
        zs.append(z.float().cpu())
        zas.append(None if z_a is None else z_a.float().cpu())
        zvs.append(None if z_v is None else z_v.float().cpu())
        ys.append(label)
    n = len(loader.dataset)
    y = gather_in_order(torch.cat(ys), n).numpy()
    z = gather_in_order(torch.cat(zs), n)
    pred = z.argmax(1).numpy()
    out = {
        "test/acc": float(np.mean(pred == y)),
        "test/macro_f1": macro_f1(pred, y, num_classes),
        "test/map": mean_average_precision(torch.softmax(z, 1).numpy(), y, num_classes),
    }
    for key, parts in (("test/acc_audio", zas), ("test/acc_visual", zvs)):
        if parts[0] is not None:
            out[key] = float(np.mean(gather_in_order(torch.cat(parts), n).argmax(1).numpy() == y))
    return out
