"""AUG (aug.py): the properties listed in docs/aug.md (Tests), on CPU with tiny tensors and tiny synthetic data."""

import copy
import json
import os
import runpy
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, ckpt, history, make_optimizer, run_inproc

import aug
from common.models import AudioEncoder, VisualEncoder, init_weights
from common.synthetic import generate

B, C = 4, 6
TRUNKS = 11_170_240 + 11_176_512  # audio (1-channel stem) + visual (3-channel stem), docs/models.md
FIRST_LAYER = 512 * 256 + 256  # 131,328


def make_args(*extra):
    return aug.parse_args(["--dataset", "synthetic", *map(str, extra)])


def setup(*extra, seed=0):
    """(args, model, optimizer) as aug.py builds them, on CPU."""
    args = make_args(*extra)
    torch.manual_seed(seed)
    model = aug.AUGClassifier(AudioEncoder(), VisualEncoder(), C)
    init_weights(model)
    return args, model, make_optimizer(args, model.parameters())


def step(model, opt, audio, visual, label, args, **kw):
    """aug.aug_step with the flags aug.py passes it."""
    return aug.aug_step(
        model,
        opt,
        audio,
        visual,
        label,
        args.lam_res,
        args.residual_source,
        args.clip_grad,
        args.zero_grad,
        **kw,
    )


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 1, 32, 32, generator=g), torch.randn(B, 3, 1, 32, 32, generator=g), torch.tensor([0, 1, 2, 3])


def clone_params(module):
    return clone_params_of(module.parameters())


def clone_params_of(params):
    return [p.detach().clone() for p in params]


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def run_inprocess(runs_dir, data_root, *extra):
    return run_inproc("aug.py", data_root, runs_dir, *extra)


# ---------------------------------------------------------------------------------------------------------------
# residual loss and loss structure
# ---------------------------------------------------------------------------------------------------------------
def test_residual_loss_two_forms_and_per_sample_weight():
    g = torch.Generator().manual_seed(0)
    prev = [3 * torch.randn(16, C, generator=g) for _ in range(2)]
    q, y = torch.randn(16, C, generator=g), torch.randint(0, C, (16,), generator=g)
    p_prev = torch.softmax(prev[0] + prev[1], 1)
    for lam in (0.2, 0.5, 1.0):
        eps = aug.residual_loss(prev, q, y, lam)
        soft_target = F.one_hot(y, C).float() * p_prev  # the release's form: CE(q, y) - lam * SoftCE(q, Y * sg(p_prev))
        release = F.cross_entropy(q, y) - lam * (-(soft_target * F.log_softmax(q, 1)).sum(1)).mean()
        assert torch.allclose(eps, release, atol=1e-6)
        w = aug.residual_weights(prev, y, lam)
        expected = torch.tensor([1 - lam * p_prev[i, y[i]].item() for i in range(16)])
        assert torch.allclose(w, expected, atol=1e-6)
        assert (w >= 1 - lam - 1e-6).all() and (w <= 1 + 1e-6).all()
        assert w.std() > 0  # confident samples count less
    assert torch.allclose(aug.residual_loss(prev, q, y, 0.0), F.cross_entropy(q, y), atol=1e-6)
    # --residual-source sum-probs (the paper): p_prev is the sum of the per-classifier softmaxes, and can exceed 1
    w = aug.residual_weights(prev, y, 0.5, "sum-probs")
    expected = 1 - 0.5 * (torch.softmax(prev[0], 1) + torch.softmax(prev[1], 1)).gather(1, y[:, None]).squeeze(1)
    assert torch.allclose(w, expected, atol=1e-6)


def test_boosting_loss_structure_and_residual_gradient():
    g = torch.Generator().manual_seed(1)
    qs, y = [torch.randn(8, C, generator=g) for _ in range(3)], torch.randint(0, C, (8,), generator=g)
    assert torch.allclose(aug.boosting_loss(qs[:1], y, 0.5), F.cross_entropy(qs[0], y))
    full = F.cross_entropy(sum(qs), y) + F.cross_entropy(qs[0] + qs[1], y) + aug.residual_loss(qs[:2], qs[2], y, 0.5)
    assert torch.allclose(aug.boosting_loss(qs, y, 0.5), full, atol=1e-6)
    # eps alone sends no gradient to the first layers of the older classifiers, only to the newest
    _, model, _ = setup()
    aug.add_classifier(model, "audio")
    aug.add_classifier(model, "audio")
    logits = model.classifier_logits(torch.randn(8, 512, generator=g), "audio")
    aug.residual_loss(logits[:-1], logits[-1], y, 0.5).backward()
    for layer in model.audio_classifiers[:-1]:
        assert layer.weight.grad is None or not layer.weight.grad.any()
    assert model.audio_classifiers[-1].weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------------
# model: the shared layer, parameter counts, ensemble output, added-classifier initialisation
# ---------------------------------------------------------------------------------------------------------------
def test_shared_head_parameter_counts_and_roles():
    _, model, _ = setup()
    n0 = sum(p.numel() for p in model.parameters())
    assert n0 == TRUNKS + 2 * FIRST_LAYER + (256 * C + C)
    aug.add_classifier(model, "visual")
    assert sum(p.numel() for p in model.parameters()) == n0 + FIRST_LAYER
    aug.add_classifier(model, "audio")
    assert sum(p.numel() for p in model.parameters()) == n0 + 2 * FIRST_LAYER
    calls = []
    model.head.register_forward_hook(lambda m, i, o: calls.append(m))
    u = torch.randn(B, 512)
    model.classifier_logits(u, "audio"), model.classifier_logits(u, "visual")
    assert len(calls) == 4 and all(m is model.head for m in calls)  # every classifier calls the one shared h
    roles = [model.audio_net, model.visual_net, model.audio_classifiers, model.visual_classifiers, model.head]
    ids = [id(p) for r in roles for p in r.parameters()]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


def test_ensemble_output_on_a_hand_computed_example():
    """dim 2, hidden 2, 2 classes, identity encoders; numbers worked out by hand. h = identity + bias (0.5, -0.5).
    u = (1, -2). L_1 = identity: ReLU(1, -2) = (1, 0), q_1 = (1.5, -0.5). L_2 swaps: ReLU(-2, 1) = (0, 1),
    q_2 = (0.5, 0.5), P = (2, 0). L_3 = 0: q_3 = h(0) = (0.5, -0.5), P = (2.5, -0.5). Audio keeps one classifier."""
    model = aug.AUGClassifier(torch.nn.Identity(), torch.nn.Identity(), 2, dim=2, hidden=2)
    with torch.no_grad():
        model.head.weight.copy_(torch.eye(2))
        model.head.bias.copy_(torch.tensor([0.5, -0.5]))
        for layer in (model.audio_classifiers[0], model.visual_classifiers[0]):
            layer.weight.copy_(torch.eye(2))
            layer.bias.zero_()
    u = torch.tensor([[1.0, -2.0]])
    expected = [[1.5, -0.5], [2.0, 0.0], [2.5, -0.5]]
    for n, (weight, p) in enumerate(zip([None, [[0.0, 1.0], [1.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]], expected)):
        if weight is not None:
            with torch.no_grad():
                aug.add_classifier(model, "visual").weight.copy_(torch.tensor(weight))
        logits = model.classifier_logits(u, "visual")
        assert len(logits) == n + 1
        assert torch.allclose(sum(logits), torch.tensor([p]))
    assert torch.allclose(sum(model.classifier_logits(u, "audio")), torch.tensor([[1.5, -0.5]]))


def test_added_classifier_init():
    _, model, _ = setup()
    for modality in ("visual", "audio", "visual"):
        n = {m: len(model.classifiers(m)) for m in ("audio", "visual")}
        layer = aug.add_classifier(model, modality)
        assert model.classifiers(modality)[-1] is layer and len(model.classifiers(modality)) == n[modality] + 1
        other = "audio" if modality == "visual" else "visual"
        assert len(model.classifiers(other)) == n[other]
        assert not layer.bias.any()
        assert abs(layer.weight.std().item() / (2 / 768) ** 0.5 - 1) < 0.05


# ---------------------------------------------------------------------------------------------------------------
# ACA decision and check epochs
# ---------------------------------------------------------------------------------------------------------------
def test_aca_decision_and_check_epochs():
    assert aug.aca_decision(1.02, 1.0, 1.0, 0.01) == 1  # audio more confident -> visual gets a classifier
    assert aug.aca_decision(0.98, 1.0, 1.0, 0.01) == -1
    assert aug.aca_decision(1.005, 1.0, 1.0, 0.01) == 0
    assert aug.aca_decision(0.995, 1.0, 1.0, 0.01) == 0
    assert aug.aca_decision(0.51, 0.5, 1.0, 0.01) == 1  # a ratio: the scale of the scores does not matter
    # --aca-rule difference: s_a - sigma s_v against +- tau
    assert aug.aca_decision(0.52, 0.5, 1.0, 0.01, "difference") == 1
    assert aug.aca_decision(0.48, 0.5, 1.0, 0.01, "difference") == -1
    assert aug.aca_decision(0.505, 0.5, 1.0, 0.01, "difference") == 0
    assert aug.aca_decision(0.051, 0.05, 1.0, 0.01, "difference") == 0  # ratio 1.02, but a difference of 0.001
    # the period: the release's E // 10 for its 100 and 200 epochs, never below the paper's shortest, 10 epochs
    assert aug.aca_check_period(200) == 20 and aug.aca_check_period(100) == 10 and aug.aca_check_period(150) == 15
    assert [aug.aca_check_period(e) for e in (1, 4, 10, 12, 99, 109, 110)] == [10] * 6 + [11]
    for epochs, expected in (
        (200, {0} | set(range(19, 200, 20))),
        (100, {0} | set(range(9, 100, 10))),
        (12, {0, 9}),
        (10, {0, 9}),
        (4, {0}),
    ):
        assert {e for e in range(epochs) if aug.is_check_epoch(e, aug.aca_check_period(epochs))} == expected
    assert len({e for e in range(200) if aug.is_check_epoch(e, 20)}) == 11
    # the synthetic preset scales the period as the epochs (100 -> 10: every epoch); the real datasets use the rule
    assert aug.AUG_PRESETS["synthetic"]["aca_check_every"] == 1 and aug.parse_args([]).aca_check_every == 1
    assert not any("aca_check_every" in row for d, row in aug.AUG_PRESETS.items() if d != "synthetic")
    assert aug.parse_args(["--dataset", "ks"]).aca_check_every == 10
    assert aug.parse_args(["--dataset", "cremad", "--epochs", "12"]).aca_check_every == 10


# ---------------------------------------------------------------------------------------------------------------
# the training step: frozen / trainable added classifiers, alternation, gradients, confidence sums
# ---------------------------------------------------------------------------------------------------------------
def test_added_classifier_frozen_by_default():
    args, model, opt = setup()
    layer = aug.add_classifier(model, "visual")
    w0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    enc0, h0, enc_a0 = clone_params(model.visual_net), clone_params(model.head), clone_params(model.audio_net)
    has_grad = []
    opt.register_step_pre_hook(lambda o, a, k: has_grad.append(layer.weight.grad is not None))
    for s in range(3):
        step(model, opt, *batch(s), args)
    assert torch.equal(layer.weight, w0) and torch.equal(layer.bias, b0)  # bitwise unchanged
    assert not {id(p) for p in layer.parameters()} & {id(p) for g in opt.param_groups for p in g["params"]}
    assert has_grad == [False, True] * 3  # audio step: none; visual step: the gradient flowed through it
    assert not same(clone_params(model.visual_net), enc0) and not same(clone_params(model.head), h0)
    assert not same(clone_params(model.audio_net), enc_a0)


def test_train_new_heads_registers_and_trains_added_classifier():
    args, model, opt = setup("--train-new-heads", "--lr-milestones", 1, 2)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(opt, args.lr_milestones, args.lr_gamma)
    step(model, opt, *batch(0), args)
    scheduler.step()  # epoch 1: LR 1e-3
    layer = aug.add_classifier(model, "visual", opt if args.train_new_heads else None)
    group = opt.param_groups[-1]
    assert len(opt.param_groups) == 2 and {id(p) for p in group["params"]} == {id(p) for p in layer.parameters()}
    assert group["lr"] == pytest.approx(1e-3) == opt.param_groups[0]["lr"]
    assert group["momentum"] == 0.9 and group["weight_decay"] == 1e-4
    w0 = layer.weight.detach().clone()
    for s in range(2):
        step(model, opt, *batch(s), args)
    assert not torch.equal(layer.weight, w0)
    scheduler.step()  # the schedule decays the new group with the others
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-4, 1e-4])


def test_alternation_visual_sees_h_after_audio_step():
    args, model, opt = setup()
    visual0 = clone_params(model.visual_net)
    events = []
    model.visual_net.register_forward_hook(lambda m, i, o: events.append(("visual_net", None)))
    model.head.register_forward_pre_hook(lambda m, i: events.append(("head", m.weight.detach().clone())))
    opt.register_step_post_hook(
        lambda o, a, k: events.append(("step", model.head.weight.detach().clone(), clone_params(model.visual_net)))
    )
    h0 = model.head.weight.detach().clone()
    step(model, opt, *batch(0), args)
    assert [e[0] for e in events] == ["visual_net", "head", "step", "head", "step"]
    assert torch.equal(events[1][1], h0)  # audio classifier: h before any step
    # visual classifiers: h after the audio step
    assert torch.equal(events[3][1], events[2][1]) and not torch.equal(events[3][1], h0)
    assert same(events[2][2], visual0)  # the audio step leaves the visual encoder (computed before it) unchanged


def record_steps(model, opt):
    """Per optimizer step: the audio side's and the visual side's parameters before and after it, their gradients as
    the step sees them ("none", "zero" or "grad" per side) and the audio side's momentum buffers before it."""
    audio = list(model.audio_net.parameters()) + list(model.audio_classifiers[0].parameters())
    visual = list(model.visual_net.parameters()) + list(model.visual_classifiers[0].parameters())
    log = []

    def grads(params):
        kinds = {"none" if p.grad is None else "zero" if not p.grad.any() else "grad" for p in params}
        return kinds.pop() if len(kinds) == 1 else "mixed"

    def pre(o, a, k):
        buf = [o.state[p]["momentum_buffer"].clone() if "momentum_buffer" in o.state[p] else None for p in audio]
        log.append(
            {
                "grads": (grads(audio), grads(visual)),
                "audio": clone_params_of(audio),
                "buf": buf,
                "visual": clone_params_of(visual),
            }
        )

    def post(o, a, k):
        log[-1].update(audio_after=clone_params_of(audio), visual_after=clone_params_of(visual))

    opt.register_step_pre_hook(pre)
    opt.register_step_post_hook(post)
    return log


@pytest.mark.parametrize("flags", [["--zero-grad", "pytorch2"], [], ["--legacy-zero-grad"]])
def test_cross_modal_updates_under_both_zero_grad_semantics(flags):
    """--zero-grad pytorch2: no step moves the other modality. pytorch1 (the default; the release on its PyTorch 1.11;
    --legacy-zero-grad is the same): the audio gradients are zeroed, not deleted, after the audio step, so the visual
    step gives the audio side a momentum and weight-decay update (p <- p - lr (momentum buf + wd p)); every gradient is
    deleted at the end of the batch, so the audio step never moves the visual side, in the first iteration or any
    later one."""
    args, model, opt = setup(*flags)
    legacy = args.zero_grad == "pytorch1"
    assert legacy == (flags != ["--zero-grad", "pytorch2"])
    group = opt.param_groups[0]
    lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
    log = record_steps(model, opt)
    for s in range(3):
        step(model, opt, *batch(s), args)
        assert all(p.grad is None for p in model.parameters())  # deleted at the end of every batch
    assert len(log) == 6
    for i in range(3):
        a_step, v_step = log[2 * i], log[2 * i + 1]
        # audio step: the visual side has no gradient and does not move (bitwise), in every iteration
        assert a_step["grads"] == ("grad", "none"), i
        assert same(a_step["visual"], a_step["visual_after"]) and not same(a_step["audio"], a_step["audio_after"])
        assert not same(v_step["visual"], v_step["visual_after"])
        if not legacy:  # visual step: the audio side has no gradient and does not move
            assert v_step["grads"] == ("none", "grad"), i
            assert same(v_step["audio"], v_step["audio_after"]), i
            continue
        # visual step: zero audio gradients, so SGD applies momentum and weight decay alone to the audio side
        assert v_step["grads"] == ("zero", "grad"), i
        assert not same(v_step["audio"], v_step["audio_after"]), i
        for p, buf, after in zip(v_step["audio"], v_step["buf"], v_step["audio_after"]):
            torch.testing.assert_close(after, p - lr * (momentum * buf + wd * p), rtol=1e-6, atol=1e-9)


def test_step_callbacks_run_sync_grads_and_clipping():
    """run(fn) wraps every forward (encoders once, each modality's classifiers once); sync_grads(model) follows each
    backward pass, before clipping and the optimizer step; clip_grad bounds the norm the optimizer sees."""
    args, model, opt = setup("--clip-grad", 1e-3)
    calls, events = [], []
    opt.register_step_pre_hook(
        lambda o, a, k: events.append(
            (
                "step",
                torch.linalg.vector_norm(
                    torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None])
                ).item(),
            )
        )
    )

    def run(fn):
        calls.append(fn)
        return fn(model)

    def sync_grads(m):
        assert m is model
        events.append(("sync", sum(p.grad is not None for p in m.parameters())))

    out = step(model, opt, *batch(0), args, forward=run, sync_grads=sync_grads)
    assert len(calls) == 3 and set(out) == {"audio", "visual"}
    assert [e[0] for e in events] == ["sync", "step", "sync", "step"]
    assert events[0][1] > 0 and events[2][1] > 0  # the gradients of that backward pass are there to average
    assert events[1][1] <= 1e-3 * (1 + 1e-4) and events[3][1] <= 1e-3 * (1 + 1e-4)


def test_add_classifier_sync_sees_the_layer_before_it_is_used():
    _, model, _ = setup()
    seen = []

    def sync(layer):  # e.g. broadcast rank 0's draw: here, overwrite it with a constant
        seen.append(layer)
        with torch.no_grad():
            layer.weight.fill_(0.25)

    layer = aug.add_classifier(model, "audio", sync=sync)
    assert seen == [layer] and model.audio_classifiers[-1] is layer and torch.all(layer.weight == 0.25)


def test_confidence_sums_match_train_mode_forward_at_lr0():
    args, model, opt = setup()
    for group in opt.param_groups:  # LR 0 (--lr 0 is refused on the command line)
        group["lr"] = 0.0
    aug.add_classifier(model, "visual")
    model.train()
    total, expected = {"audio": 0.0, "visual": 0.0}, {"audio": 0.0, "visual": 0.0}
    for s in range(3):
        audio, visual, y = batch(s)
        with torch.no_grad():
            for m, x, net in (("audio", audio, model.audio_net), ("visual", visual, model.visual_net)):
                p = torch.softmax(sum(model.classifier_logits(net(x), m)), 1)
                expected[m] += p.gather(1, y[:, None]).sum().item()
        out = step(model, opt, audio, visual, y, args)
        for m in total:
            assert all(isinstance(v, float) for v in out[m].values())  # plain floats: no graph is kept
            total[m] += out[m]["score"]
    for m in total:
        assert total[m] == pytest.approx(expected[m], abs=1e-5)
    assert total["visual"] != pytest.approx(total["audio"])


def train_mode_scores(model, audio, visual, y):
    """{source: {modality: summed true-class score}} from a train-mode forward pass of a copy of the model as it is
    now (a copy, so the run's BatchNorm statistics stay untouched): softmax(sum_j q_j)[y] for "ensemble",
    sum_j softmax(q_j)[y] for "sum-probs"."""
    ref = copy.deepcopy(model).train()
    out = {"ensemble": {}, "sum-probs": {}}
    with torch.no_grad():
        for m, x, net in (("audio", audio, ref.audio_net), ("visual", visual, ref.visual_net)):
            u = net(x)
            qs = [ref.head(F.relu(layer(u))) for layer in ref.classifiers(m)]
            out["ensemble"][m] = torch.softmax(sum(qs), 1).gather(1, y[:, None]).sum().item()
            out["sum-probs"][m] = sum(torch.softmax(q, 1) for q in qs).gather(1, y[:, None]).sum().item()
    return out


def test_confidence_scores_are_taken_before_each_step():
    """The release scores each modality on the logits its own step used: audio before the audio step, visual after
    the audio step (so with its h) and before the visual step. At LR 0.1 one step changes the scores visibly."""
    args, model, opt = setup()
    for group in opt.param_groups:
        group["lr"] = 0.1
    aug.add_classifier(model, "visual")
    audio, visual, y = batch(0)
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append(train_mode_scores(model, audio, visual, y)["ensemble"]))
    opt.register_step_post_hook(lambda o, a, k: seen.append(train_mode_scores(model, audio, visual, y)["ensemble"]))
    out = step(model, opt, audio, visual, y, args)
    before_audio, after_audio, before_visual, after_visual = seen
    assert out["audio"]["score"] == pytest.approx(before_audio["audio"], abs=1e-5)
    assert out["visual"]["score"] == pytest.approx(before_visual["visual"], abs=1e-5)
    assert abs(after_audio["audio"] - before_audio["audio"]) > 1e-3  # the test can tell before from after
    assert abs(after_visual["visual"] - before_visual["visual"]) > 1e-3
    assert abs(before_visual["visual"] - before_audio["visual"]) > 1e-3  # the audio step's h counts for visual


# ---------------------------------------------------------------------------------------------------------------
# inference fusion and the unimodal metrics
# ---------------------------------------------------------------------------------------------------------------
def test_merge_logits_and_unimodal_metrics():
    # fusion by hand: audio says class 0 (2 vs 0), visual class 1 (0 vs 1.5). alpha 0.4: (0.8, 0.9) -> class 1;
    # alpha 0.5: (1.0, 0.75) -> class 0; alpha 1: audio alone, alpha 0: visual alone
    p_a, p_v = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 1.5]])
    assert torch.allclose(aug.merge_logits(p_a, p_v, 0.4), torch.tensor([[0.8, 0.9]]))
    assert [aug.merge_logits(p_a, p_v, alpha).argmax(1).item() for alpha in (0.4, 0.5)] == [1, 0]
    assert torch.equal(aug.merge_logits(p_a, p_v, 1.0), p_a) and torch.equal(aug.merge_logits(p_a, p_v, 0.0), p_v)
    probs = torch.tensor(
        [[0.7, 0.2, 0.1], [0.3, 0.6, 0.1], [0.1, 0.8, 0.1], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8], [0.5, 0.1, 0.4]]
    )
    y = torch.tensor([0, 0, 1, 1, 2, 2]).numpy()
    perfect = 5 * F.one_hot(torch.tensor([0, 0, 1, 1, 2, 2]), 3).float()
    recorded = [(probs[:4].log(), perfect[:4]), (probs[4:].log(), perfect[4:])]  # two test batches
    m = aug.unimodal_metrics(recorded, y, 3)
    # by hand: F1 per class 1/2, 4/5, 2/3; AP per class (1 + 2/3)/2, (1 + 2/3)/2, 1
    assert m["test/macro_f1_audio"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert m["test/map_audio"] == pytest.approx((5 / 6 + 5 / 6 + 1) / 3)
    assert m["test/macro_f1_visual"] == pytest.approx(1.0) and m["test/map_visual"] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------------------------
# whole runs: smoke, ACA in the loop, checkpoints, --eval-only, --resume, imbalance
# ---------------------------------------------------------------------------------------------------------------
KEYS = [
    "train/loss",
    "train/loss_audio",
    "train/loss_visual",
    "train/ce_audio",
    "train/ce_visual",
    "train/ratio",
    "train/coeff_audio",
    "train/coeff_visual",
    "train/score_audio",
    "train/score_visual",
    "train/aca_action",
    "test/acc",
    "test/acc_audio",
    "test/acc_visual",
    "test/macro_f1",
    "test/map",
    "test/macro_f1_audio",
    "test/map_audio",
    "test/macro_f1_visual",
    "test/map_visual",
    "charts/lr",
    "charts/samples_per_sec",
]


def test_smoke_and_logged_keys(tiny_data, tmp_path):
    run = run_inprocess(tmp_path, tiny_data, *"--epochs 2 --max-steps 2".split())
    with open(os.path.join(run, "results.json")) as f:
        r = json.load(f)
    assert r["epochs_run"] == 2 and 0 <= r["best"]["test/acc"] <= 1
    for row in history(run):
        assert set(KEYS) <= set(row), set(KEYS) - set(row)
        assert row["train/ratio"] == pytest.approx(row["train/score_audio"] / row["train/score_visual"])
        assert 0 < row["train/score_audio"] <= 1 and row["charts/lr"] == 1e-2


def test_merge_alpha_one_gives_audio_accuracy(tiny_data, tmp_path):
    run = run_inprocess(tmp_path, tiny_data, *"--epochs 1 --max-steps 1 --merge-alpha 1.0".split())
    row = history(run)[0]
    assert row["test/acc"] == row["test/acc_audio"] and row["test/map"] == row["test/map_audio"]


def test_aca_adds_to_weaker_modality_exactly_when_the_rule_says(tiny_data, tmp_path):
    # with the default thresholds, every epoch a check: logged decision == rule on the logged scores, counts follow
    run = run_inprocess(tmp_path / "rule", tiny_data, *"--epochs 3 --max-steps 2 --aca-check-every 1".split())
    rows = history(run)
    for e, row in enumerate(rows):
        rule = aug.aca_decision(row["train/score_audio"], row["train/score_visual"], 1.0, 0.01)
        assert row["train/aca_action"] == (rule if e + 1 < len(rows) else 0)
        if e + 1 < len(rows):
            assert rows[e + 1]["train/coeff_visual"] == row["train/coeff_visual"] + (rule == 1)
            assert rows[e + 1]["train/coeff_audio"] == row["train/coeff_audio"] + (rule == -1)
    # sigma 100: audio is always the less confident side. Period 3: checks after epochs 0 and 2; epoch 1 is no check
    # epoch and 2 is the last (a classifier added then would never be trained or evaluated)
    run = run_inprocess(
        tmp_path / "forced", tiny_data, *"--epochs 3 --max-steps 2 --aca-check-every 3 --aca-sigma 100".split()
    )
    rows = history(run)
    assert [r["train/aca_action"] for r in rows] == [-1, 0, 0]
    assert [r["train/coeff_audio"] for r in rows] == [1, 2, 2] and [r["train/coeff_visual"] for r in rows] == [1] * 3
    assert ckpt(run)["added"] == ["audio"]


def eval_only(capsys, tiny_data, tmp_path, checkpoint):
    capsys.readouterr()
    argv = [
        "aug.py",
        "--dataset",
        "synthetic",
        "--data-root",
        str(tiny_data),
        "--runs-dir",
        str(tmp_path),
        "--no-progress",
        "--eval-only",
        "--checkpoint",
        checkpoint,
    ]
    old, sys.argv = sys.argv, argv
    try:
        runpy.run_path(os.path.join(ROOT, "aug.py"), run_name="__main__")
    except SystemExit as e:
        assert e.code in (0, None)
    finally:
        sys.argv = old
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(checkpoint)][-1]
    return dict(kv.split("=") for kv in line.split(": ", 1)[1].split())


def test_checkpoint_with_added_classifiers_evaluates_to_same_accuracy(tiny_data, tmp_path, capsys):
    # sigma 1e-6, tau 0: the visual side gets a classifier after every check (epochs 0 and 1; not after the last)
    run = run_inprocess(
        tmp_path / "run",
        tiny_data,
        *"--epochs 3 --max-steps 2 --aca-check-every 1 --aca-sigma 1e-6 --aca-tau 0 --save-best".split(),
    )
    rows = history(run)
    last, best = ckpt(run), ckpt(run, "best.pt")
    assert last["added"] == ["visual", "visual"]
    assert len([k for k in last["model"] if k.startswith("visual_classifiers.") and k.endswith(".weight")]) == 3
    # best.pt is the model as evaluated at its epoch: the classifiers added *after* that epoch are not in it
    assert best["added"] == ["visual"] * best["epoch"]
    for name, row in (("last.pt", rows[-1]), ("best.pt", rows[best["epoch"]])):
        m = eval_only(capsys, tiny_data, tmp_path / "eval", os.path.join(run, name))
        for key in ("acc", "acc_audio", "acc_visual", "macro_f1"):
            assert float(m[key]) == pytest.approx(row[f"test/{key}"], abs=5e-5), (name, key)


def test_rebuilt_model_reproduces_logits():
    _, model, _ = setup()
    for modality in ("visual", "audio", "visual"):
        aug.add_classifier(model, modality)
    state = model.state_dict()
    _, fresh, _ = setup(seed=1)
    for modality in ("visual", "audio", "visual"):  # what --eval-only and --resume do with ckpt["added"]
        aug.add_classifier(fresh, modality)
    fresh.load_state_dict(state)
    model.eval(), fresh.eval()
    audio, visual, _ = batch(0)
    with torch.no_grad():
        for m, x in (("audio", model.audio_net(audio)), ("visual", model.visual_net(visual))):
            assert torch.equal(sum(model.classifier_logits(x, m)), sum(fresh.classifier_logits(x, m)))


@pytest.mark.parametrize("train_new_heads", [False, True])
def test_resume_with_added_classifiers(tiny_data, tmp_path, train_new_heads):
    flags = ["--epochs", 2, "--max-steps", 2, "--aca-check-every", 1, "--aca-sigma", 1e-6, "--aca-tau", 0]
    flags += ["--train-new-heads"] if train_new_heads else []
    straight = history(run_inprocess(tmp_path / "straight", tiny_data, *flags))
    run = run_inprocess(tmp_path / "split", tiny_data, *flags, "--stop-after-epochs", 1)
    first = ckpt(run)
    assert first["added"] == ["visual"] and len(first["optimizer"]["param_groups"]) == 1 + train_new_heads
    shutil.copy(os.path.join(run, "last.pt"), tmp_path / "after_epoch0.pt")
    old, sys.argv = sys.argv, ["aug.py", "--resume", run, "--no-progress", "--data-root", str(tiny_data)]
    try:
        runpy.run_path(os.path.join(ROOT, "aug.py"), run_name="__main__")
    finally:
        sys.argv = old
    resumed = history(run)
    assert len(resumed) == 2
    for a, b in zip(straight, resumed):  # the interrupted run continues exactly as the uninterrupted one
        for k in KEYS:
            if not k.startswith("charts/"):
                assert a[k] == b[k], (a["epoch"], k)
    final = ckpt(run)
    assert final["added"] == ["visual"] and len(final["optimizer"]["param_groups"]) == 1 + train_new_heads
    w_added = torch.load(tmp_path / "after_epoch0.pt", weights_only=False)["model"]["visual_classifiers.1.weight"]
    # the classifier added after epoch 0 trained during epoch 1 only with --train-new-heads
    assert torch.equal(final["model"]["visual_classifiers.1.weight"], w_added) != train_new_heads


def resume(run, tiny_data):
    old, sys.argv = sys.argv, ["aug.py", "--resume", run, "--no-progress", "--data-root", str(tiny_data)]
    try:
        runpy.run_path(os.path.join(ROOT, "aug.py"), run_name="__main__")
    finally:
        sys.argv = old


@pytest.mark.parametrize("legacy,want", [(False, "pytorch2"), (True, "pytorch1")])
def test_resume_of_a_run_saved_before_zero_grad_existed(tiny_data, tmp_path, legacy, want):
    """A checkpoint whose args have `legacy_zero_grad` and no `zero_grad` (written before --zero-grad, when PyTorch 2's
    semantics were the default) resumes with the semantics it was trained with."""
    run = run_inprocess(tmp_path, tiny_data, *"--epochs 2 --max-steps 1 --stop-after-epochs 1".split())
    saved = ckpt(run)
    del saved["args"]["zero_grad"]
    saved["args"]["legacy_zero_grad"] = legacy
    torch.save(saved, os.path.join(run, "last.pt"))
    run_inprocess(tmp_path, tiny_data, "--resume", run)
    assert ckpt(run)["epoch"] == 1 and ckpt(run)["args"]["zero_grad"] == want


def test_resume_when_an_added_head_already_has_momentum(tiny_data, tmp_path):
    """--train-new-heads: the head added after epoch 0 trains in epoch 1 (momentum buffers in its own param group);
    stopping after epoch 1 and resuming must end bitwise where the uninterrupted run ends (model and optimizer)."""
    flags = [
        "--epochs",
        3,
        "--max-steps",
        2,
        "--aca-check-every",
        1,
        "--aca-sigma",
        1e-6,
        "--aca-tau",
        0,
        "--train-new-heads",
    ]
    straight = run_inprocess(tmp_path / "straight", tiny_data, *flags)
    run = run_inprocess(tmp_path / "split", tiny_data, *flags, "--stop-after-epochs", 2)
    stopped = ckpt(run)
    assert stopped["added"] == ["visual", "visual"] and len(stopped["optimizer"]["param_groups"]) == 3
    head_ids = stopped["optimizer"]["param_groups"][1]["params"]  # the first added head's weight and bias
    assert all(stopped["optimizer"]["state"][i]["momentum_buffer"].abs().sum() > 0 for i in head_ids)
    resume(run, tiny_data)
    a, b = ckpt(straight), ckpt(run)
    assert a["added"] == b["added"] == ["visual", "visual"]
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for i, state in a["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["optimizer"]["state"][i]["momentum_buffer"]), i
    assert [r["test/acc"] for r in history(straight)] == [r["test/acc"] for r in history(run)]


def test_max_classifiers_caps_the_additions_in_the_loop(tiny_data, tmp_path):
    """sigma 1e-6, tau 0 asks for a visual classifier at every check; --max-classifiers 3 (the first one included)
    lets two through (after epochs 0 and 1) and refuses the third (after epoch 2); epoch 3 is the last."""
    run = run_inprocess(
        tmp_path,
        tiny_data,
        *"--epochs 4 --max-steps 1 --aca-check-every 1 --aca-sigma 1e-6 --aca-tau 0 --max-classifiers 3".split(),
    )
    rows = history(run)
    assert [r["train/aca_action"] for r in rows] == [1, 1, 0, 0]
    assert [r["train/coeff_visual"] for r in rows] == [1, 2, 3, 3] and [r["train/coeff_audio"] for r in rows] == [1] * 4
    assert ckpt(run)["added"] == ["visual", "visual"]
    # --max-classifiers 1: the first classifier is the cap, nothing is ever added
    run = run_inprocess(
        tmp_path / "one",
        tiny_data,
        *"--epochs 2 --max-steps 1 --aca-check-every 1 --aca-sigma 1e-6 --aca-tau 0 --max-classifiers 1".split(),
    )
    assert [r["train/aca_action"] for r in history(run)] == [0, 0]


def test_aca_rule_difference_in_the_loop(tiny_data, tmp_path):
    """The difference rule compares the epoch-mean scores: s_a - sigma s_v against +- tau. sigma 0, tau 0.5: nothing is
    added while s_a < 0.5 (after two steps it is near chance), where the ratio rule (s_a / s_v > 0.5) or a difference
    of the sums (8 s_a > 0.5) would add to visual. sigma 10, tau 0.05: s_a - 10 s_v < -0.05, so audio gets one."""
    flags = ["--epochs", 2, "--max-steps", 2, "--aca-rule", "difference"]
    run = run_inprocess(tmp_path / "none", tiny_data, *flags, *"--aca-sigma 0 --aca-tau 0.5".split())
    row = history(run)[0]
    s_a, s_v = row["train/score_audio"], row["train/score_visual"]
    assert s_a < 0.5 and s_a / s_v > 0.5 and 8 * s_a > 0.5  # the premise: the other two readings would add
    assert row["train/aca_action"] == 0 and ckpt(run)["added"] == []
    run = run_inprocess(tmp_path / "audio", tiny_data, *flags, *"--aca-sigma 10 --aca-tau 0.05".split())
    rows = history(run)
    assert rows[0]["train/score_audio"] - 10 * rows[0]["train/score_visual"] < -0.05
    assert rows[0]["train/aca_action"] == -1 and [r["train/coeff_audio"] for r in rows] == [1, 2]
    assert ckpt(run)["added"] == ["audio"]


def test_sum_probs_scores_in_the_loop(tiny_data, tmp_path, monkeypatch):
    """--residual-source sum-probs: the logged scores are the epoch means of sum_j softmax(q_j)[y], recomputed here
    from a copy of the model right before each step (its batch recorded from the training loader; sync_grads, called
    after each backward, gives the model). One classifier: the same as the ensemble's score; more: a different one."""
    import common.data
    import common.distributed

    epochs, current = [], {}
    real_loaders, real_sync = common.data.make_loaders, common.distributed.sync_grads

    class Recording:  # the training loader, remembering the batch being trained
        def __init__(self, loader):
            self.loader, self.generator, self.sampler = loader, loader.generator, loader.sampler

        def __len__(self):
            return len(self.loader)

        def __iter__(self):
            epochs.append({"sum-probs": [0.0, 0.0], "ensemble": [0.0, 0.0], "n": 0, "calls": 0})
            for b in self.loader:
                current["batch"] = b
                yield b

    def make_loaders(*a, **k):
        train, test = real_loaders(*a, **k)
        return Recording(train), test

    def sync_grads(model):
        real_sync(model)
        e = epochs[-1]
        spec, frames, y = current["batch"]
        i = e["calls"] % 2  # 0: the audio step, 1: the visual step
        if i == 0:
            e["n"] += y.shape[0]
        e["calls"] += 1
        scores = train_mode_scores(model, spec.unsqueeze(1), frames, y)
        for source in ("sum-probs", "ensemble"):
            e[source][i] += scores[source][("audio", "visual")[i]]

    monkeypatch.setattr(common.data, "make_loaders", make_loaders)
    monkeypatch.setattr(common.distributed, "sync_grads", sync_grads)
    run = run_inprocess(
        tmp_path,
        tiny_data,
        *"--epochs 3 --max-steps 2 --aca-check-every 1 --aca-sigma 1e-6 --aca-tau 0".split(),
        *"--residual-source sum-probs".split(),
    )
    rows = history(run)
    assert [r["train/coeff_visual"] for r in rows] == [1, 2, 3] and len(epochs) == 3
    for row, e in zip(rows, epochs):
        assert e["calls"] == 4 and e["n"] == 8
        for i, m in enumerate(("audio", "visual")):
            assert row[f"train/score_{m}"] == pytest.approx(e["sum-probs"][i] / e["n"], rel=1e-5), (row["epoch"], m)
        assert e["sum-probs"][0] == pytest.approx(e["ensemble"][0], rel=1e-5)  # audio keeps one classifier
        if row["train/coeff_visual"] > 1:
            assert abs(e["sum-probs"][1] - e["ensemble"][1]) > 1e-3 * e["n"]


def test_imbalance_first_check_adds_to_visual(tmp_path):
    """Clean audio, pure-noise video: after epoch 0 audio is the more confident side, so visual gets the classifier."""
    generate(
        str(tmp_path / "data" / "synthetic"),
        n_train=48,
        n_test=12,
        audio_snr=10.0,
        visual_strength=0.0,
        uninformative_audio=0.0,
    )
    run = run_inprocess(
        tmp_path / "runs", tmp_path / "data", *"--epochs 2 --batch-size 8 --stop-after-epochs 1".split()
    )
    row = history(run)[0]
    assert row["train/score_audio"] > 1.01 * row["train/score_visual"]
    assert row["train/aca_action"] == 1 and ckpt(run)["added"] == ["visual"]


# ---------------------------------------------------------------------------------------------------------------
# the defaults and edges of the block's functions, and the best-epoch tie rule
# ---------------------------------------------------------------------------------------------------------------
def test_true_class_prob_defaults_to_the_ensemble():
    g = torch.Generator().manual_seed(0)
    logits, y = [torch.randn(5, 4, generator=g) for _ in range(3)], torch.tensor([0, 1, 2, 3, 0])
    ens = torch.softmax(sum(logits), 1)[torch.arange(5), y]
    torch.testing.assert_close(aug.true_class_prob(logits, y), ens)
    assert not torch.allclose(aug.true_class_prob(logits, y, "sum-probs"), ens)


def test_aca_decision_default_rule_is_the_ratio_and_the_rules_disagree():
    """Scores 0.204 vs 0.2 (sigma 1, tau 0.01): a ratio of 1.02 adds to visual, a difference of 0.004 adds nothing."""
    assert aug.aca_decision(0.204, 0.2, 1.0, 0.01) == aug.aca_decision(0.204, 0.2, 1.0, 0.01, "ratio") == 1
    assert aug.aca_decision(0.196, 0.2, 1.0, 0.01) == -1
    assert aug.aca_decision(0.204, 0.2, 1.0, 0.01, "difference") == 0
    assert aug.aca_decision(0.196, 0.2, 1.0, 0.01, "difference") == 0


def test_aca_decision_thresholds_are_strict():
    """On the thresholds exactly (values exact in binary), nothing is added; just beyond them, one is."""
    for rule in ("ratio", "difference"):
        assert aug.aca_decision(1.5, 1.0, 1.0, 0.5, rule) == 0  # r = sigma + tau, d = tau
        assert aug.aca_decision(0.5, 1.0, 1.0, 0.5, rule) == 0  # r = sigma - tau, d = -tau
        assert aug.aca_decision(1.5000001, 1.0, 1.0, 0.5, rule) == 1
        assert aug.aca_decision(0.4999999, 1.0, 1.0, 0.5, rule) == -1


def test_aca_ratio_with_a_zero_visual_score_adds_to_visual():
    assert aug.aca_decision(0.3, 0.0, 1.0, 0.01) == 1  # r = inf, no division by zero


def test_best_epoch_ties_go_to_the_later_epoch(tiny_data, tmp_path):
    """A learning rate of 1e-12: the test accuracy stays put, so epochs tie; best.pt is the last of the tied."""
    run = run_inprocess(tmp_path, tiny_data, *"--epochs 3 --max-steps 1 --lr 1e-12".split())
    rows = history(run)
    accs = [r["test/acc"] for r in rows]
    tied = [e for e, a in enumerate(accs) if a == max(accs)]
    assert len(tied) >= 2, accs  # precondition: a tie
    with open(os.path.join(run, "results.json")) as f:
        assert json.load(f)["best"]["epoch"] == tied[-1]


def test_logged_loss_is_the_two_steps_losses(tiny_data, tmp_path):
    """One step per epoch: train/loss is the audio step's loss plus the visual step's; once a classifier has been
    added to each side (epochs 1 and 2, forced), those residual losses differ from the ensembles' CE."""
    for sigma, side in (("1e-6", "visual"), ("100", "audio")):  # sigma 1e-6: visual is weaker; 100: audio
        rows = history(
            run_inprocess(
                tmp_path / side,
                tiny_data,
                *"--epochs 2 --max-steps 1 --aca-check-every 1 --aca-sigma".split(),
                sigma,
                "--aca-tau",
                "0",
                "--train-new-heads",
            )
        )
        for row in rows:
            assert row["train/loss"] == pytest.approx(row["train/loss_audio"] + row["train/loss_visual"], rel=1e-6)
        assert rows[1][f"train/coeff_{side}"] == 2  # precondition: an added classifier
        assert rows[1][f"train/loss_{side}"] != pytest.approx(rows[1][f"train/ce_{side}"], rel=1e-3)
