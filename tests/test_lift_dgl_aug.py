"""The ALGO LOGIC BLOCKs of dgl.py and aug.py, lifted out of their scripts with `conftest.load_block` (executed with
nothing but the builtins in scope, so they run on their own imports), applied to toy two-encoder models written here:
the properties of the methods (docs/dgl.md, docs/aug.md) hold through the lifted code alone, as they would in another
project.

DGL: each encoder is trained only by alpha * CE of its own unimodal logits, the head only by the fused loss, and the
single-pass and two-pass backwards agree. AUG: the added classifier fits the residual of the previous ones (with a
detached residual weight), the audio step moves only the audio side, and ACA adds to the less confident modality.
"""

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import load_block

C, D, H, B = 4, 6, 5, 32  # classes, encoder feature size, AUG hidden size, batch


@pytest.fixture(scope="module")
def dgl_blk():
    return load_block("dgl.py")


@pytest.fixture(scope="module")
def aug_blk():
    return load_block("aug.py")


@pytest.mark.parametrize(
    "script,names",
    [
        ("dgl.py", {"dgl_logits", "dgl_loss", "dgl_backward", "grad_norm"}),
        (
            "aug.py",
            {
                "AUGClassifier",
                "add_classifier",
                "true_class_prob",
                "residual_weights",
                "residual_loss",
                "boosting_loss",
                "aug_step",
                "merge_logits",
                "aca_check_period",
                "is_check_epoch",
                "aca_decision",
            },
        ),
    ],
)
def test_block_is_self_contained(script, names):
    blk = load_block(script)  # fails on an import or a name from the rest of the script
    assert names <= set(vars(blk))
    assert not set(vars(blk)) & {
        "np",
        "runs",
        "distributed",
        "unimodal_logits",
        "AVClassifier",
        "GatedHead",
        "random",
        "readout",
        "forward",
        "init_weights",
        "AudioEncoder",
        "VisualEncoder",
    }


def toy_data(n=B, seed=0, dominant="audio"):
    """The dominant modality's 8 inputs encode the label; the other's are pure noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % C
    informative = 2.0 * F.one_hot(y, 8).float() + 0.1 * torch.randn(n, 8, generator=g)
    noise = torch.randn(n, 8, generator=g)
    return (informative, noise, y) if dominant == "audio" else (noise, informative, y)


# ----------------------------------------------------------------------------------------------------------------
# DGL
# ----------------------------------------------------------------------------------------------------------------
class ConcatHead(nn.Module):
    """head(a, v) -> (a, v, W [a; v] + b), the interface dgl_logits expects."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2 * D, C)

    def forward(self, a, v):
        return a, v, self.fc(torch.cat([a, v], 1))


def zero_fill(head, f_a, f_v):
    """The readout: W [a; 0] + b and W [0; v] + b (zero-fill, full bias)."""
    w, b = head.fc.weight, head.fc.bias
    return f_a @ w[:, :D].T + b, f_v @ w[:, D:].T + b


class DGLToy(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.audio_net, self.visual_net, self.head = nn.Linear(8, D), nn.Linear(8, D), ConcatHead()
        with torch.no_grad():
            self.head.fc.bias.copy_(torch.linspace(-1, 1, C))  # a non-zero bias, so full vs half bias matters


def grads(module):
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in module.parameters()]


def dgl_grads(blk, model, x_a, x_v, y, alpha, impl, fused=None):
    model = copy.deepcopy(model)
    z, z_a, z_v = blk.dgl_logits(model.head, model.audio_net(x_a), model.visual_net(x_v), zero_fill, impl, fused)
    loss, loss_f, loss_a, loss_v = blk.dgl_loss(z, z_a, z_v, y, alpha)
    blk.dgl_backward(model.head, loss, loss_f, loss_a, loss_v, alpha, impl)
    return {r: grads(getattr(model, r)) for r in ("audio_net", "visual_net", "head")}, (loss, loss_f, loss_a, loss_v)


def dgl_reference(model, x_a, x_v, y, alpha):
    """Written here from the method's definition: encoder m <- grad of alpha CE(z_m) alone, z_m through the head's
    weights; head <- grad of CE(head(a, v)) on constant features."""
    model = copy.deepcopy(model)
    a, v = model.audio_net(x_a), model.visual_net(x_v)
    w, b = model.head.fc.weight, model.head.fc.bias
    ref = {
        "audio_net": torch.autograd.grad(
            alpha * F.cross_entropy(a @ w[:, :D].T + b, y), list(model.audio_net.parameters()), retain_graph=True
        ),
        "visual_net": torch.autograd.grad(
            alpha * F.cross_entropy(v @ w[:, D:].T + b, y), list(model.visual_net.parameters()), retain_graph=True
        ),
    }
    features = torch.cat([a, v], 1).detach()
    ref["head"] = torch.autograd.grad(F.cross_entropy(features @ w.T + b, y), list(model.head.parameters()))
    return ref


@pytest.mark.parametrize("impl", ["single-pass", "two-pass"])
def test_dgl_each_part_gets_only_its_own_loss(dgl_blk, impl):
    x_a, x_v, y = toy_data()
    model, alpha = DGLToy(), 3.0
    g, (loss, loss_f, loss_a, loss_v) = dgl_grads(dgl_blk, model, x_a, x_v, y, alpha, impl)
    ref = dgl_reference(model, x_a, x_v, y, alpha)
    for role in ("audio_net", "visual_net", "head"):
        assert all(r.abs().sum() > 0 for r in ref[role])  # precondition: every reference gradient is non-trivial
        for got, want in zip(g[role], ref[role]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, msg=f"{impl} {role}")
    a, v = model.audio_net(x_a), model.visual_net(x_v)
    z_a, z_v = zero_fill(model.head, a, v)
    assert loss_a.item() == pytest.approx(F.cross_entropy(z_a, y).item(), rel=1e-6)
    assert loss_v.item() == pytest.approx(F.cross_entropy(z_v, y).item(), rel=1e-6)
    assert loss_f.item() == pytest.approx(F.cross_entropy(model.head(a, v)[2], y).item(), rel=1e-6)
    assert loss.item() == pytest.approx(loss_f.item() + alpha * (loss_a.item() + loss_v.item()), rel=1e-6)


def test_dgl_single_pass_equals_two_pass(dgl_blk):
    x_a, x_v, y = toy_data(seed=1)
    model = DGLToy(seed=1).double()
    x_a, x_v = x_a.double(), x_v.double()
    g1, _ = dgl_grads(dgl_blk, model, x_a, x_v, y, 4.0, "single-pass")
    g2, _ = dgl_grads(dgl_blk, model, x_a, x_v, y, 4.0, "two-pass")
    for role in g1:
        for p1, p2 in zip(g1[role], g2[role]):
            assert torch.equal(p1, p2), role  # float64: bitwise


def test_dgl_fused_replaces_the_detached_head_call(dgl_blk):
    """fused(a, v) -> z takes the place of head(a.detach(), v.detach()); the unimodal path is unchanged."""
    x_a, x_v, y = toy_data(seed=2)
    model = DGLToy(seed=2)
    a, v = model.audio_net(x_a), model.visual_net(x_v)
    marker = torch.full((B, C), 0.5)
    z, z_a, z_v = dgl_blk.dgl_logits(model.head, a, v, zero_fill, fused=lambda a_, v_: marker)
    assert z is marker
    ref_a, ref_v = zero_fill(model.head, a, v)
    assert torch.equal(z_a, ref_a) and torch.equal(z_v, ref_v)


def test_dgl_single_pass_unimodal_logits_lead_only_to_the_encoders(dgl_blk):
    """single-pass: the head copy behind z_a, z_v is frozen, so on constant features they need no gradient at all
    (no parameter, not even a copy's, is reached); two-pass: they do, through the live head."""
    x_a, x_v, _ = toy_data(seed=6)
    model = DGLToy(seed=6)
    with torch.no_grad():
        a, v = model.audio_net(x_a), model.visual_net(x_v)
    _, z_a, z_v = dgl_blk.dgl_logits(model.head, a, v, zero_fill, "single-pass")
    assert not z_a.requires_grad and not z_v.requires_grad
    _, z_a, z_v = dgl_blk.dgl_logits(model.head, a, v, zero_fill, "two-pass")
    assert z_a.requires_grad and z_v.requires_grad
    _, z_a, z_v = dgl_blk.dgl_logits(model.head, a, v, zero_fill)  # the documented default: single-pass
    assert not z_a.requires_grad and not z_v.requires_grad


def test_dgl_grad_norm(dgl_blk):
    m = nn.Linear(3, 2)
    assert dgl_blk.grad_norm(m) == 0.0
    m.weight.grad, m.bias.grad = torch.full((2, 3), 1.0), torch.full((2,), 2.0)
    assert dgl_blk.grad_norm(m) == pytest.approx(math.sqrt(6 + 8))


# ----------------------------------------------------------------------------------------------------------------
# AUG
# ----------------------------------------------------------------------------------------------------------------
def aug_toy(blk, seed=0):
    torch.manual_seed(seed)
    return blk.AUGClassifier(nn.Linear(8, D), nn.Linear(8, D), C, dim=D, hidden=H)


def test_aug_boosting_loss_trains_the_new_classifier_on_the_residual(aug_blk):
    """Two classifiers: L = CE(q1 + q2) + CE(q1) + mean(-w log softmax(q2)[y]), w = 1 - lam sg(softmax(q1)[y])."""
    model, lam = aug_toy(aug_blk), 0.5
    x_a, _, y = toy_data(seed=3)
    with torch.no_grad():  # sharper earlier classifier, so the weights w spread out
        model.audio_classifiers[0].weight.mul_(4)
    assert len(model.classifier_logits(model.audio_net(x_a), "audio")) == 1
    assert torch.allclose(
        aug_blk.boosting_loss(model.classifier_logits(model.audio_net(x_a), "audio"), y, lam),
        F.cross_entropy(model.head(F.relu(model.audio_classifiers[0](model.audio_net(x_a)))), y),
    )
    aug_blk.add_classifier(model, "audio")
    params = list(model.parameters())

    u = model.audio_net(x_a)
    logits = model.classifier_logits(u, "audio")
    assert len(logits) == 2
    loss = aug_blk.boosting_loss(logits, y, lam)
    got = torch.autograd.grad(loss, params, allow_unused=True)

    # the reference, from the definition (fresh forward, the layers read directly)
    u = model.audio_net(x_a)
    q1 = model.head(F.relu(model.audio_classifiers[0](u)))
    q2 = model.head(F.relu(model.audio_classifiers[1](u)))
    w = 1 - lam * torch.softmax(q1, 1).gather(1, y[:, None]).squeeze(1).detach()
    assert w.std() > 0.01 and (w < 1).all() and (w >= 1 - lam).all()
    eps = (-w * F.log_softmax(q2, 1).gather(1, y[:, None]).squeeze(1)).mean()
    ref = F.cross_entropy(q1 + q2, y) + F.cross_entropy(q1, y) + eps
    want = torch.autograd.grad(ref, params, allow_unused=True)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    for (name, _), g, r in zip(model.named_parameters(), got, want):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7, msg=name)
    torch.testing.assert_close(aug_blk.residual_weights([q1], y, lam), w)

    # the residual term alone reaches the newest classifier, not the earlier one (w carries no gradient)
    logits = model.classifier_logits(model.audio_net(x_a), "audio")
    eps_blk = aug_blk.residual_loss(logits[:-1], logits[-1], y, lam)
    assert eps_blk.item() == pytest.approx(eps.item(), rel=1e-6)
    g_old, g_new = torch.autograd.grad(
        eps_blk, [model.audio_classifiers[0].weight, model.audio_classifiers[1].weight], allow_unused=True
    )
    assert (g_old is None or not g_old.any()) and g_new.abs().sum() > 0

    # a third classifier fits the residual of the ensemble of the first two: w = 1 - lam sg(softmax(q1 + q2)[y])
    aug_blk.add_classifier(model, "audio")
    logits = model.classifier_logits(model.audio_net(x_a), "audio")
    q1, q2, q3 = (model.head(F.relu(layer(model.audio_net(x_a)))) for layer in model.audio_classifiers)
    w = 1 - lam * torch.softmax(q1 + q2, 1).gather(1, y[:, None]).squeeze(1).detach()
    ref = (
        F.cross_entropy(q1 + q2 + q3, y)
        + F.cross_entropy(q1 + q2, y)
        + (-w * F.log_softmax(q3, 1).gather(1, y[:, None]).squeeze(1)).mean()
    )
    assert aug_blk.boosting_loss(logits, y, lam).item() == pytest.approx(ref.item(), rel=1e-6)


def param_snapshot(params):
    return [p.detach().clone() for p in (params.parameters() if isinstance(params, nn.Module) else params)]


def moved(before, after):
    return [not torch.equal(a, b) for a, b in zip(before, after)]


@pytest.mark.parametrize("zero_grad", ["pytorch2", "pytorch1"])
def test_aug_step_moves_audio_params_on_the_audio_step_only(aug_blk, zero_grad):
    """SGD with momentum and weight decay (as the release): the audio encoder and classifier move in the audio step
    by exactly -lr grad(L_a), and (zero_grad "pytorch2") not at all in the visual step; the visual side the other way
    round. With the default "pytorch1" (the release on its PyTorch 1.11) the visual step moves the audio side too
    (zero gradients: momentum and weight decay), and still no audio step moves the visual side."""
    model, lam, lr = aug_toy(aug_blk, seed=4), 0.5, 0.1
    aug_blk.add_classifier(model, "audio")  # two audio classifiers: L_a is the boosting loss, not a plain CE
    x_a, x_v, y = toy_data(seed=4)
    audio = list(model.audio_net.parameters()) + list(model.audio_classifiers.parameters())
    visual = list(model.visual_net.parameters()) + list(model.visual_classifiers.parameters())
    ref_model = copy.deepcopy(model)
    ref_audio = list(ref_model.audio_net.parameters()) + list(ref_model.audio_classifiers.parameters())
    ref_logits = ref_model.classifier_logits(ref_model.audio_net(x_a), "audio")
    ref_loss = aug_blk.boosting_loss(ref_logits, y, lam)
    ref_grad = torch.autograd.grad(ref_loss, ref_audio)

    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    snaps = [(param_snapshot(audio), param_snapshot(visual), param_snapshot(model.head))]
    opt.register_step_post_hook(
        lambda o, a, k: snaps.append((param_snapshot(audio), param_snapshot(visual), param_snapshot(model.head)))
    )
    # the second batch: momentum buffers exist, so a stale gradient would move the other side
    kw = {"zero_grad": "pytorch2"} if zero_grad == "pytorch2" else {}  # pytorch1: the block's default
    out = [aug_blk.aug_step(model, opt, x_a, x_v, y, lam, **kw) for _ in range(2)]
    assert len(snaps) == 5 and set(out[0]) == {"audio", "visual"}
    # what the first audio step reports: L_a, CE(P_a) and the sum of softmax(P_a)[y], all before its update
    assert out[0]["audio"]["loss"] == pytest.approx(ref_loss.item(), rel=1e-6)
    assert out[0]["audio"]["ce"] == pytest.approx(F.cross_entropy(sum(ref_logits), y).item(), rel=1e-6)
    ref_score = torch.softmax(sum(ref_logits), 1).gather(1, y[:, None]).sum().item()
    assert out[0]["audio"]["score"] == pytest.approx(ref_score, rel=1e-6) and ref_score > 1  # a sum over the batch
    for i in (1, 3):  # audio steps
        assert all(moved(snaps[i - 1][0], snaps[i][0])) and not any(moved(snaps[i - 1][1], snaps[i][1]))
    for i in (2, 4):  # visual steps
        assert all(moved(snaps[i - 1][0], snaps[i][0])) == (zero_grad == "pytorch1")
        assert any(moved(snaps[i - 1][0], snaps[i][0])) == (zero_grad == "pytorch1")
        assert all(moved(snaps[i - 1][1], snaps[i][1]))
    assert all(all(moved(snaps[i - 1][2], snaps[i][2])) for i in range(1, 5))  # the shared h moves in both
    for p0, p1, g in zip(snaps[0][0], snaps[1][0], ref_grad):  # first step: plain SGD on L_a (+ weight decay)
        torch.testing.assert_close(p1, p0 - lr * (g + 1e-4 * p0), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("rule", ["ratio", "difference"])
def test_aca_decision_picks_the_weaker_side(aug_blk, rule):
    """+1 (add to visual) when audio's score is higher, -1 (add to audio) the other way, 0 in the dead zone."""
    d = aug_blk.aca_decision
    assert d(0.9, 0.5, 1.0, 0.01, rule) == 1
    assert d(0.5, 0.9, 1.0, 0.01, rule) == -1
    assert d(0.6, 0.6, 1.0, 0.01, rule) == 0
    assert d(0.603, 0.6, 1.0, 0.01, rule) == 0 and d(0.597, 0.6, 1.0, 0.01, rule) == 0  # inside +- tau
    assert d(0.62, 0.6, 1.0, 0.01, rule) == 1 and d(0.58, 0.6, 1.0, 0.01, rule) == -1  # just outside
    assert d(0.9, 0.5, 2.0, 0.01, rule) == -1  # sigma moves the centre: 0.9 < 2 x 0.5


@pytest.mark.parametrize("dominant,expected", [("audio", 1), ("visual", -1)])
@pytest.mark.parametrize("rule", ["ratio", "difference"])
def test_aca_after_training_adds_to_the_uninformative_modality(aug_blk, dominant, expected, rule):
    """A few aug_steps on data where one modality carries the label: its mean true-class score is the higher one,
    and ACA gives the new classifier to the other modality."""
    model = aug_toy(aug_blk, seed=5)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    score = [0.0, 0.0]
    for i in range(60):  # a fresh batch each step: the noise modality cannot memorise it
        x_a, x_v, y = toy_data(seed=100 + i, dominant=dominant)
        out = aug_blk.aug_step(model, opt, x_a, x_v, y, 0.5)
        score = [out["audio"]["score"] / B, out["visual"]["score"] / B]  # the last step's mean scores
    with torch.no_grad():
        for m, x, net in (("audio", x_a, model.audio_net), ("visual", x_v, model.visual_net)):
            s = aug_blk.true_class_prob(model.classifier_logits(net(x), m), y).mean().item()
            assert 0 < s < 1
    assert score[0 if dominant == "audio" else 1] > 1.3 * score[1 if dominant == "audio" else 0]
    action = aug_blk.aca_decision(score[0], score[1], 1.0, 0.01, rule)
    assert action == expected
    weak = {1: "visual", -1: "audio"}[action]
    aug_blk.add_classifier(model, weak, opt)
    assert len(model.classifiers(weak)) == 2 and len(model.classifiers(dominant)) == 1
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["params"][0] is model.classifiers(weak)[1].weight
