"""Learning-rate sweep on the lift tests' toy MLP model (tests/mlp_toy.py): the largest learning rate at which joint
training and each method train without a dead encoder. A measurement, not a test (pytest does not collect it):

    python tests/lr_sweep.py                       # every method, the default grid and seeds (about 2 minutes)
    python tests/lr_sweep.py --methods joint arl --lrs 0.01 0.05 --seeds 0 1
    python tests/lr_sweep.py --aug-periods 1 2 3 5 10 12   # AUG with fixed ACA check periods instead
    python tests/lr_sweep.py --scale                 # the first step's loss and gradient norms vs joint training's

Each run is the user's loop of the method's docs page ("Use it in your own project") on the toy: 512 training
samples, batch 32, SGD (momentum 0.9, weight decay 1e-4) at a constant LR, 12 epochs, the block's functions
imported from the method's script, the method's default values (those of the docs snippets).

A run TRAINS when its loss stays finite and neither encoder is dead (a diverged run, or one whose OPM score sum
underflows to 0, does not train). An encoder is DEAD when a linear probe on its frozen features (softmax
regression on the 512 training samples, tested on 512 others) is at chance: accuracy <= 1/C + 0.10 (0.35 for the 4
classes). A ReLU encoder whose every output unit is 0 on every input (the way a too large step kills these
encoders) gives the probe a constant input, so it is dead by this rule; the table also gives the share of output
units that are 0 on every test input ("zero units"). The table: per method and LR, how many seeds trained and how
many diverged, the mean over the seeds that did not diverge of the test accuracy (fused; AUG: its merged 0.4 / 0.6
prediction) and of the probe accuracies; then per method the largest LR of the grid up to which every seed trained
at every LR.
"""

import argparse
import math
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

from mlp_toy import C, ConcatHead, MLPModel, make_data, probe_accuracy, split_logits, zero_fill  # noqa: E402

import arl  # noqa: E402
import aug  # noqa: E402
import dgl  # noqa: E402
import ogm  # noqa: E402
import opm  # noqa: E402

METHODS = ["joint", "ogm", "opm", "arl", "dgl", "aug"]
N_TRAIN, N_TEST, BATCH, EPOCHS = 512, 512, 32, 12
DEAD_PROBE = 1 / C + 0.10


class Diverged(Exception):
    pass


def batches(data, epoch, seed):
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    perm = torch.randperm(N_TRAIN, generator=g)
    for i in range(0, N_TRAIN, BATCH):
        idx = perm[i : i + BATCH]
        yield data[0][idx], data[1][idx], data[2][idx]


def sgd(params, lr):
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)


def train(method, lr, seed, epochs=EPOCHS, aug_period=None):
    """One run; returns (the MLP model (its encoders are the run's), predict(x_a, x_v) -> logits, classifiers added
    by AUG). A non-finite loss raises Diverged."""
    train_data = make_data(N_TRAIN, seed=100 + seed)
    model = MLPModel(seed=seed)
    added = 0
    if method == "aug":  # AUG replaces the head: its classifiers on the encoders' features, widths from the model
        net = aug.AUGClassifier(
            model.audio_net,
            model.visual_net,
            C,
            dim=(model.audio_net[-2].out_features, model.visual_net[-2].out_features),
        )
        opt = sgd(net.parameters(), lr)
        period = aug_period or aug.aca_check_period(epochs)
        for epoch in range(epochs):
            score = [0.0, 0.0, 0]
            for x_a, x_v, y in batches(train_data, epoch, seed):
                out = aug.aug_step(net, opt, x_a, x_v, y, lam=0.5)
                score = [score[0] + out["audio"][2], score[1] + out["visual"][2], score[2] + len(y)]
                if not math.isfinite(out["audio"][0] + out["visual"][0]):
                    raise Diverged
            if aug.is_check_epoch(epoch, period) and epoch < epochs - 1:
                action = aug.aca_decision(score[0] / score[2], score[1] / score[2], sigma=1.0, tau=0.01)
                if action:
                    aug.add_classifier(net, "visual" if action > 0 else "audio")
                    added += 1

        def predict(x_a, x_v):
            p_a = sum(net.classifier_logits(net.audio_net(x_a), "audio"))
            p_v = sum(net.classifier_logits(net.visual_net(x_v), "visual"))
            return aug.merge_logits(p_a, p_v, 0.4)

        return model, predict, added

    head = model.head
    params = list(model.parameters())
    opt = sgd(params, lr)
    gen = torch.Generator().manual_seed(seed + 1)  # OGM's noise, OPM's drops
    coeff = (0.5, 0.5)  # ARL's coefficients, carried from step to step
    dgl_head = ConcatHead(head)
    for epoch in range(epochs):
        for x_a, x_v, y in batches(train_data, epoch, seed):
            a, v = model.audio_net(x_a), model.visual_net(x_v)
            if method == "joint":
                loss = F.cross_entropy(head(torch.cat([a, v], 1)), y)
            elif method == "ogm":
                z = head(torch.cat([a, v], 1))
                s = ogm.ogm_scores(*split_logits(head, a, v, "half"), y)
                k_a, k_v, audio_dominant = ogm.ogm_coefficients(s[0], s[1], alpha=0.8)
                loss = F.cross_entropy(z, y)
            elif method == "opm":
                if opm.opm_active(epoch, warmup_epochs=1):
                    with torch.no_grad():
                        s_a, s_v = opm.opm_scores(*split_logits(head, a, v, "half"), y).tolist()
                    q_a, q_v = opm.drop_probabilities(s_a, s_v, q_base=0.5, lam=0.5)
                    a, v, y, _, _ = opm.opm_drop(a, v, y, q_a, q_v, 0.7, gen)
                loss = F.cross_entropy(head(torch.cat([a, v], 1)), y)
            elif method == "arl":
                on = epoch >= 1  # warm-up: 1 epoch
                if on:
                    a, v = arl.GradScale.apply(a, coeff[0]), arl.GradScale.apply(v, coeff[1])
                z = head(torch.cat([a, v], 1))
                z_a, z_v = split_logits(head, a, v, "full")
                loss = arl.arl_loss(z, z_a, z_v, y, 4.0 if on else 1.0)[0]
                if on:
                    c = arl.arl_coefficients(z_a.detach(), z_v.detach(), temperature=8.0)
                    coeff = (c["c_a"].item(), c["c_v"].item())
            elif method == "dgl":
                z, z_a, z_v = dgl.dgl_logits(dgl_head, a, v, zero_fill)
                losses = dgl.dgl_loss(z, z_a, z_v, y, alpha=4.0)
                loss = losses[0]
            else:
                raise SystemExit(f"--methods: unknown method {method!r}; choose from {METHODS}")
            if not math.isfinite(loss.item()):
                raise Diverged
            opt.zero_grad()
            if method == "dgl":
                dgl.dgl_backward(dgl_head, *losses, alpha=4.0)
            else:
                loss.backward()
            if method == "ogm":
                noise_a, noise_v = ogm.ge_noise(True, "both", audio_dominant)
                ogm.modulate_gradients(
                    model.audio_net, model.visual_net, k_a, k_v, noise_a, noise_v, gen, params="nonbias"
                )
            if method in ("arl", "dgl"):
                torch.nn.utils.clip_grad_norm_(params, 40.0)
            opt.step()

    def predict(x_a, x_v):
        return model(x_a, x_v)[2]

    return model, predict, added


def measure(method, lr, seed, aug_period=None):
    torch.manual_seed(seed)
    try:
        model, predict, added = train(method, lr, seed, aug_period=aug_period)
    except (Diverged, ZeroDivisionError):  # a non-finite loss; or a score sum of exactly 0 (OPM divides by it)
        nan = float("nan")
        return dict(acc=nan, probe_a=nan, probe_v=nan, zero_a=nan, zero_v=nan, trained=False, added=nan, diverged=True)
    tr, te = make_data(N_TRAIN, seed=100 + seed), make_data(N_TEST, seed=200 + seed)
    with torch.no_grad():
        logits = predict(te[0], te[1])
        acc = (logits.argmax(1) == te[2]).float().mean().item() if torch.isfinite(logits).all() else float("nan")
        zero = [
            (net(x) == 0).all(0).float().mean().item()
            for net, x in ((model.audio_net, te[0]), (model.visual_net, te[1]))
        ]
    probe = [
        probe_accuracy(model.audio_net, (tr[0], tr[2]), (te[0], te[2])),
        probe_accuracy(model.visual_net, (tr[1], tr[2]), (te[1], te[2])),
    ]
    trained = all(p > DEAD_PROBE for p in probe)
    return dict(
        acc=acc,
        probe_a=probe[0],
        probe_v=probe[1],
        zero_a=zero[0],
        zero_v=zero[1],
        trained=trained,
        added=added,
        diverged=False,
    )


def grad_norm(module):
    return math.sqrt(sum(p.grad.pow(2).sum().item() for p in module.parameters() if p.grad is not None))


def first_step(method, seed):
    """The loss and the gradient norms (audio encoder, visual encoder, head) of the method's first step after its
    warm-up, from the toy's initialisation, on the first batch of epoch 0 (OGM with GE noise; OPM's drop executed;
    ARL with its starting coefficients 0.5, 0.5; AUG: the sum of its two steps' losses, each encoder's gradient in
    its own step, and no head row: it has none of the user's)."""
    model = MLPModel(seed=seed)
    x_a, x_v, y = next(batches(make_data(N_TRAIN, seed=100 + seed), 0, seed))
    head, gen = model.head, torch.Generator().manual_seed(seed + 1)
    if method == "aug":
        net = aug.AUGClassifier(model.audio_net, model.visual_net, C, dim=(24, 40))
        opt = torch.optim.SGD(net.parameters(), lr=0.0)  # LR 0: the step only reads the gradients
        norms = []
        opt.register_step_pre_hook(lambda o, a, k: norms.append((grad_norm(net.audio_net), grad_norm(net.visual_net))))
        out = aug.aug_step(net, opt, x_a, x_v, y, lam=0.5)
        return out["audio"][0] + out["visual"][0], norms[0][0], norms[1][1], float("nan")
    a, v = model.audio_net(x_a), model.visual_net(x_v)
    z = head(torch.cat([a, v], 1))
    if method in ("joint", "ogm"):
        loss = F.cross_entropy(z, y)
    elif method == "opm":
        with torch.no_grad():
            s_a, s_v = opm.opm_scores(*split_logits(head, a, v, "half"), y).tolist()
        q_a, q_v = opm.drop_probabilities(s_a, s_v, q_base=0.5, lam=0.5)
        a, v, y, _, _ = opm.opm_drop(a, v, y, q_a, q_v, 1.0, gen)
        loss = F.cross_entropy(head(torch.cat([a, v], 1)), y)
    elif method == "arl":
        a, v = arl.GradScale.apply(a, 0.5), arl.GradScale.apply(v, 0.5)
        z = head(torch.cat([a, v], 1))
        loss = arl.arl_loss(z, *split_logits(head, a, v, "full"), y, 4.0)[0]
    else:
        dgl_head = ConcatHead(head)
        losses = dgl.dgl_loss(*dgl.dgl_logits(dgl_head, a, v, zero_fill), y, alpha=4.0)
        loss = losses[0]
    if method == "dgl":
        dgl.dgl_backward(dgl_head, *losses, alpha=4.0)
    else:
        loss.backward()
    if method == "ogm":
        with torch.no_grad():
            s = ogm.ogm_scores(*split_logits(head, model.audio_net(x_a), model.visual_net(x_v), "half"), y)
        k_a, k_v, audio_dominant = ogm.ogm_coefficients(s[0], s[1], alpha=0.8)
        ogm.modulate_gradients(
            model.audio_net,
            model.visual_net,
            k_a,
            k_v,
            *ogm.ge_noise(True, "both", audio_dominant),
            gen,
            params="nonbias",
        )
    return loss.item(), grad_norm(model.audio_net), grad_norm(model.visual_net), grad_norm(head)


def scale_table(methods, seeds):
    print(
        "first step after the warm-up, from the same initialisation and batch; ratios to joint training's, mean "
        f"over seeds {seeds}"
    )
    print(
        "| method | loss | loss / joint | audio encoder gradient / joint | visual encoder gradient / joint | "
        "head gradient / joint |"
    )
    print("|---|---|---|---|---|---|")
    ref = [first_step("joint", s) for s in seeds]
    for method in methods:
        r = [first_step(method, s) for s in seeds]
        ratios = [mean([x[i] / j[i] for x, j in zip(r, ref)]) for i in range(4)]
        cells = " | ".join("–" if math.isnan(x) else f"{x:.2f}" for x in ratios)
        print(f"| {method} | {mean([x[0] for x in r]):.2f} | {cells} |")


def mean(xs):
    xs = [x for x in xs if not math.isnan(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--lrs", nargs="+", type=float, default=[0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument(
        "--aug-periods",
        nargs="+",
        type=int,
        default=None,
        help="AUG only: one row per fixed ACA check period (default: aca_check_period(12))",
    )
    p.add_argument(
        "--scale",
        action="store_true",
        help="only the first-step table: loss and gradient norms relative to joint training's",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    start = time.time()
    if args.scale:
        return scale_table(args.methods, args.seeds)
    print(
        f"toy: MLP encoders 24 / 40 wide, nn.Linear head, {N_TRAIN} training samples, batch {BATCH}, SGD momentum "
        f"0.9, {EPOCHS} epochs; dead = linear-probe accuracy <= {DEAD_PROBE:.2f}"
    )
    print(
        "| method | LR | seeds trained | diverged | test acc | probe audio | probe visual | zero units a / v | "
        "AUG added |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    rows = [(m, None) for m in args.methods] if args.aug_periods is None else [("aug", k) for k in args.aug_periods]
    best, failed = {}, set()
    for method, period in rows:
        name = method if period is None else f"aug, period {period}"
        for lr in args.lrs:
            r = [measure(method, lr, s, period) for s in args.seeds]
            ok = sum(x["trained"] for x in r)
            if ok < len(r):
                failed.add(name)
            elif name not in failed:  # every LR of the grid up to this one trained
                best[name] = lr
            print(
                f"| {name} | {lr:g} | {ok}/{len(r)} | {sum(x['diverged'] for x in r)} | "
                f"{mean([x['acc'] for x in r]):.3f} | "
                f"{mean([x['probe_a'] for x in r]):.3f} | {mean([x['probe_v'] for x in r]):.3f} | "
                f"{mean([x['zero_a'] for x in r]):.2f} / {mean([x['zero_v'] for x in r]):.2f} | "
                f"{mean([x['added'] for x in r]):.1f} |",
                flush=True,
            )
    print("\nlargest LR of the grid up to which every seed trained at every LR:")
    for method, period in rows:
        name = method if period is None else f"aug, period {period}"
        print(f"  {name}: {best.get(name, 'none')}")
    print(f"({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
