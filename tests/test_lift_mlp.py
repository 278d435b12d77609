"""The five ALGO LOGIC BLOCKs, lifted with `conftest.load_block` (nothing but the builtins and the block's own
imports), on a model unlike the project's (tests/mlp_toy.py): two ReLU MLP encoders of unequal widths (24 and 40,
not 512) and a plain `nn.Linear` head on the concatenated features, with the adapters the docs pages give for such a
head (`split_logits`: its column blocks, widths read off the features). Each test checks the method's defining
property there (docs/<method>.md), and that a selection which would find nothing says so instead of doing nothing.
"""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import load_block
from mlp_toy import D_A, D_V, C, ConcatHead, MLPModel, joint_steps, make_data, split_logits, zero_fill


@pytest.fixture(scope="module")
def blocks():
    return {m: load_block(f"{m}.py") for m in ("ogm", "opm", "arl", "dgl", "aug")}


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def dominant_model(dominant, dtype=torch.float32):
    """The MLP model after a few joint steps on data where `dominant` is the easy modality."""
    model = MLPModel(seed=1)
    x_a, x_v, y = joint_steps(model, dominant=dominant)
    return model.to(dtype), (x_a.to(dtype), x_v.to(dtype), y)


def scores(blk_scores, model, batch):
    a, v, z = model(batch[0], batch[1])
    z_a, z_v = split_logits(model.head, a, v, "half")
    torch.testing.assert_close(z_a + z_v, z)  # the adapter's half-bias logits sum to the fused ones
    return a, v, z, blk_scores(z_a, z_v, batch[2])


# ----------------------------------------------------------------------------------------------------------------
# OGM: params="nonbias" scales the dominant MLP encoder's weight gradients by k; "conv" refuses to do nothing
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dominant", ["audio", "visual"])
def test_ogm_mlp_nonbias_scales_the_dominant_encoders_weight_gradients(blocks, dominant):
    blk = blocks["ogm"]
    model, batch = dominant_model(dominant)
    a, v, z, s = scores(blk.ogm_scores, model, batch)
    k_a, k_v, audio_dominant = blk.ogm_coefficients(s[0], s[1], 0.8)
    assert audio_dominant == (dominant == "audio") and min(k_a, k_v) < 0.5  # precondition: a clear dominance
    F.cross_entropy(z, batch[2]).backward()
    old = grads(model)
    blk.modulate_gradients(model.audio_net, model.visual_net, k_a, k_v, False, False, params="nonbias")
    new = grads(model)
    k_dom, dom = (k_a, "audio_net.") if dominant == "audio" else (k_v, "visual_net.")
    n_scaled = 0
    for n, g in old.items():
        assert g.abs().sum() > 0, n  # every gradient non-zero: "scaled" and "unchanged" can be told apart
        if n.startswith(dom) and n.endswith("weight"):
            assert torch.equal(new[n], g * k_dom), n
            n_scaled += 1
        else:  # biases, the weaker encoder, the head
            assert torch.equal(new[n], g), n
    assert n_scaled == 2  # the two Linear weights of the dominant MLP


def test_ogm_mlp_ge_noise_on_weight_gradients_only(blocks):
    blk = blocks["ogm"]
    model, batch = dominant_model("audio")
    a, v, z, s = scores(blk.ogm_scores, model, batch)
    k_a, k_v, audio_dominant = blk.ogm_coefficients(s[0], s[1], 0.8)
    F.cross_entropy(z, batch[2]).backward()
    old = grads(model)
    blk.modulate_gradients(
        model.audio_net,
        model.visual_net,
        k_a,
        k_v,
        *blk.ge_noise(True, "both", audio_dominant),
        torch.Generator().manual_seed(0),
        params="nonbias",
    )
    for n, g in grads(model).items():
        k = k_a if n.startswith("audio_net") else k_v
        if n.endswith("weight") and not n.startswith("head"):
            assert not torch.allclose(g, k * old[n]), n  # noise added to both encoders' weight gradients
        else:
            assert torch.equal(g, old[n]), n


def test_ogm_mlp_conv_selects_nothing_and_says_so(blocks):
    """The release's default, params="conv", on MLP encoders would leave every gradient as it is (joint training):
    it raises a one-line error naming the encoder and the fix, and edits nothing."""
    blk = blocks["ogm"]
    model, batch = dominant_model("audio")
    with pytest.raises(ValueError, match=r"of audio_net \(no 4-D gradient; call it after backward") as e:
        blk.modulate_gradients(model.audio_net, model.visual_net, 0.3, 1.0, True, True)  # before backward()
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"params='nonbias' selects no gradient of audio_net \(no non-1-D gradient"):
        blk.modulate_gradients(model.audio_net, model.visual_net, 0.3, 1.0, True, True, params="nonbias")
    F.cross_entropy(model(batch[0], batch[1])[2], batch[2]).backward()
    old = grads(model)
    with pytest.raises(ValueError, match="params='conv' selects no gradient of audio_net .*params='nonbias'") as e:
        blk.modulate_gradients(model.audio_net, model.visual_net, 0.3, 1.0, True, True)
    assert "\n" not in str(e.value)
    # a conv audio encoder and an MLP visual one: the visual side is refused, and the audio side is not edited
    conv = nn.Conv2d(1, 2, 3)
    conv.weight.grad, conv.bias.grad = torch.ones_like(conv.weight), torch.ones_like(conv.bias)
    with pytest.raises(ValueError, match="selects no gradient of visual_net"):
        blk.modulate_gradients(conv, model.visual_net, 0.3, 1.0, True, True, torch.Generator().manual_seed(0))
    assert torch.equal(conv.weight.grad, torch.ones_like(conv.weight))
    with pytest.raises(ValueError, match="params='weights'; use 'conv'"):
        blk.modulate_gradients(model.audio_net, model.visual_net, 0.3, 1.0, False, False, params="weights")
    new = grads(model)
    assert all(torch.equal(new[n], g) for n, g in old.items())
    blk.modulate_gradients(conv, model.visual_net, 0.5, 1.0, False, False, params="nonbias")  # 4-D is non-1-D too
    assert torch.equal(conv.weight.grad, torch.full_like(conv.weight, 0.5))


# ----------------------------------------------------------------------------------------------------------------
# OPM: the dominant modality dropped at rate q; theta weighs q by the feature widths
# ----------------------------------------------------------------------------------------------------------------
def release_theta(q_a, q_v, d_a, d_v):
    # BML_TPAMI2024 code/models/Classifier.py L39-41: d_sum = sum(dim_list); q_sum = sum(dim_list * q);
    # theta = q_sum / d_sum (dim_list: code/config.py L41, d = [512, 512])
    return (d_a * q_a + d_v * q_v) / (d_a + d_v)


@pytest.mark.parametrize("dominant", ["audio", "visual"])
def test_opm_mlp_unequal_widths_drop_at_rate_q_and_rescale_by_the_width_weighted_theta(blocks, dominant):
    blk = blocks["opm"]
    model, batch = dominant_model(dominant)
    a, v, z, s = scores(blk.opm_scores, model, batch)
    a, v, y = a.detach(), v.detach(), batch[2]
    q_a, q_v = blk.drop_probabilities(s[0].item(), s[1].item(), 0.5, 0.5)
    q = max(q_a, q_v)
    assert (q_a > 0) == (dominant == "audio") and min(q_a, q_v) == 0 and q > 0.55  # precondition
    theta = release_theta(q_a, q_v, D_A, D_V)
    factor = 1 / (1 - theta)
    assert abs(factor - 1 / (1 - q / 2)) > 0.02  # the widths matter: not the equal-width theta = mean(q)
    assert blk.rescale_factors(q_a, q_v, "mean", (D_A, D_V)) == (pytest.approx(factor, rel=1e-12),) * 2
    gen = torch.Generator().manual_seed(0)
    executed, zeroed, seen = 0, 0, 0
    for _ in range(300):
        a_t, v_t, y_t, ex, (frac_a, frac_v) = blk.opm_drop(a, v, y, q_a, q_v, 0.7, gen)
        if not ex:
            assert a_t is a and v_t is v
            continue
        executed += 1
        assert torch.equal(y_t, y) and a_t.shape == a.shape and v_t.shape == v.shape  # widths kept, none removed
        dom_t, dom, weak_t, weak = (a_t, a, v_t, v) if dominant == "audio" else (v_t, v, a_t, a)
        gone = dom_t.abs().sum(1) == 0
        zeroed, seen = zeroed + int(gone.sum()), seen + len(y)
        assert (frac_a if dominant == "audio" else frac_v) == pytest.approx(gone.float().mean().item())
        torch.testing.assert_close(weak_t, weak * factor)  # the weak side: every row, rescaled
        torch.testing.assert_close(dom_t[~gone], dom[~gone] * factor)
    assert abs(executed / 300 - 0.7) < 0.08  # 300 Bernoulli(0.7) steps: std 0.026
    assert abs(zeroed / seen - q) < 0.02  # about 210 x 256 draws: std about 0.002


def test_opm_mlp_gradient_through_the_drop(blocks):
    """Kept dominant samples and every weak sample pass gradient scaled by 1 / (1 - theta); dropped ones none."""
    blk = blocks["opm"]
    model, batch = dominant_model("audio", torch.float64)
    x_a, x_v, y = batch
    keep_a = (torch.arange(len(y)) % 3 != 0).double()
    q_a, q_v = 0.6, 0.0
    f = 1 / (1 - release_theta(q_a, q_v, D_A, D_V))
    a, v = model.audio_net(x_a), model.visual_net(x_v)
    a_t, v_t, y_t = blk.drop_features(a, v, y, keep_a, torch.ones(len(y), dtype=torch.float64), q_a, q_v)
    F.cross_entropy(model.head(torch.cat([a_t, v_t], 1)), y_t).backward()
    got = grads(model)
    model.zero_grad()
    a, v = model.audio_net(x_a), model.visual_net(x_v)
    F.cross_entropy(model.head(torch.cat([a * keep_a[:, None] * f, v * f], 1)), y).backward()
    for n, g in grads(model).items():
        torch.testing.assert_close(got[n], g, rtol=1e-12, atol=1e-15, msg=n)


def test_opm_rescale_factors_widths_and_modes(blocks):
    blk = blocks["opm"]
    for q_a, q_v in ((0.6, 0.0), (0.0, 0.7133), (0.31, 0.12)):
        equal = 1 / (1 - (q_a + q_v) / 2)
        assert blk.rescale_factors(q_a, q_v) == (equal, equal)  # the default: equal widths
        for d in (512, 48, 3):
            assert blk.rescale_factors(q_a, q_v, "mean", (d, d)) == (equal, equal)  # bitwise, any equal width
        for d_a, d_v in ((D_A, D_V), (D_V, D_A), (512, 128)):
            f = 1 / (1 - release_theta(q_a, q_v, d_a, d_v))
            assert blk.rescale_factors(q_a, q_v, "mean", (d_a, d_v)) == (pytest.approx(f, rel=1e-12),) * 2
        per = tuple(1 / (1 - q) for q in (q_a, q_v))
        assert blk.rescale_factors(q_a, q_v, "per-modality", (D_A, D_V)) == per  # widths do not enter
        assert blk.rescale_factors(q_a, q_v, "none", (D_A, D_V)) == (1.0, 1.0)
    assert blk.rescale_factors(1.0, 1.0, "mean", (D_A, D_V)) == (0.0, 0.0)  # everything dropped
    with pytest.raises(ValueError, match="rescale='per_modality'; use 'mean', 'per-modality' or 'none'"):
        blk.rescale_factors(0.5, 0.0, "per_modality")


# ----------------------------------------------------------------------------------------------------------------
# ARL: encoder gradients times 1 + c_m through GradScale; c boosts the side relied upon less than its reliability
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("coeff", [(0.8, 0.2), (0.15, 0.85)])
def test_arl_mlp_encoder_gradients_times_one_plus_c(blocks, coeff):
    blk = blocks["arl"]
    model, (x_a, x_v, y) = dominant_model("audio", torch.float64)

    def step(scale):
        model.zero_grad()
        a, v = model.audio_net(x_a), model.visual_net(x_v)
        if scale:
            a, v = blk.GradScale.apply(a, coeff[0]), blk.GradScale.apply(v, coeff[1])
        z = model.head(torch.cat([a, v], 1))
        z_a, z_v = split_logits(model.head, a, v, "full")  # zero-fill, with gradient
        loss, loss_f, loss_a, loss_v = blk.arl_loss(z, z_a, z_v, y, 4.0)
        assert loss.item() == pytest.approx(loss_f.item() + 4 * (loss_a.item() + loss_v.item()), rel=1e-12)
        loss.backward()
        return grads(model)

    ref, got = step(False), step(True)
    for n, g in ref.items():
        s = 1 + coeff[0] if n.startswith("audio_net") else 1 + coeff[1] if n.startswith("visual_net") else 1.0
        assert g.abs().sum() > 0, n
        torch.testing.assert_close(got[n], s * g, rtol=1e-12, atol=1e-15, msg=n)


def shares(z_a, z_v, floor=0.3):
    """d_a: share of the batch-mean |logit| (summed over classes); w_a: inverse of the floored entropy shares."""
    dep = [z.abs().mean(0).sum().item() for z in (z_a, z_v)]
    ent = [-(torch.softmax(z, 1) * torch.log_softmax(z, 1)).sum(1).mean().item() for z in (z_a, z_v)]
    h = [max(e / sum(ent), floor) for e in ent]
    return dep[0] / sum(dep), (1 / h[0]) / (1 / h[0] + 1 / h[1])


@pytest.mark.parametrize("dominant", ["audio", "visual"])
def test_arl_mlp_coefficients_boost_the_side_relied_upon_below_its_reliability(blocks, dominant):
    """On the MLP's zero-fill logits (scaled to move the shares both ways): c_a = sigmoid(T (w_a - d_a)), so the
    side whose dependence share d is below its inverse-variance share w gets the larger coefficient."""
    blk = blocks["arl"]
    model, batch = dominant_model(dominant)
    with torch.no_grad():
        a, v, _ = model(batch[0], batch[1])
        z_a0, z_v0 = split_logits(model.head, a, v, "full")
    outcomes = set()
    for s_a, s_v in ((1, 1), (0.2, 1), (1, 0.2), (3, 1), (1, 3)):
        z_a, z_v = z_a0 * s_a, z_v0 * s_v
        d_a, w_a = shares(z_a, z_v)
        r = blk.arl_coefficients(z_a, z_v, 8.0)
        assert r["d_a"].item() == pytest.approx(d_a, abs=1e-5) and r["w_a"].item() == pytest.approx(w_a, abs=1e-5)
        assert r["c_a"].item() == pytest.approx(1 / (1 + math.exp(-8.0 * (w_a - d_a))), abs=1e-5)
        assert (r["c_a"] + r["c_v"]).item() == pytest.approx(1.0, abs=1e-6)
        if abs(w_a - d_a) > 1e-3:
            assert (r["c_a"] > r["c_v"]) == (d_a < w_a), (s_a, s_v)
            outcomes.add(d_a < w_a)
    assert outcomes == {True, False}


# ----------------------------------------------------------------------------------------------------------------
# DGL: with the head adapter, each encoder gets only alpha CE of its own logits, the head only the fused CE
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["single-pass", "two-pass"])
def test_dgl_mlp_each_part_gets_only_its_own_loss(blocks, impl):
    blk = blocks["dgl"]
    model, (x_a, x_v, y) = dominant_model("audio", torch.float64)
    head, alpha = ConcatHead(model.head), 4.0
    z, z_a, z_v = blk.dgl_logits(head, model.audio_net(x_a), model.visual_net(x_v), zero_fill, impl)
    blk.dgl_backward(head, *blk.dgl_loss(z, z_a, z_v, y, alpha), alpha, impl)
    got = grads(model)
    # the reference, from the definition: encoder m <- alpha CE(z_m); head <- CE(z) on constant features
    a, v = model.audio_net(x_a), model.visual_net(x_v)
    w, b = model.head.weight, model.head.bias
    want = {}
    for role, feat, cols in (("audio_net", a, slice(0, D_A)), ("visual_net", v, slice(D_A, D_A + D_V))):
        params = dict(getattr(model, role).named_parameters())
        g = torch.autograd.grad(
            alpha * F.cross_entropy(feat @ w[:, cols].T + b, y), list(params.values()), retain_graph=True
        )
        want |= {f"{role}.{n}": gi for n, gi in zip(params, g)}
    g = torch.autograd.grad(F.cross_entropy(torch.cat([a, v], 1).detach() @ w.T + b, y), [w, b])
    want |= {"head.weight": g[0], "head.bias": g[1]}
    assert set(got) == set(want)
    for n, g in want.items():
        assert g.abs().sum() > 0, n
        torch.testing.assert_close(got[n], g, rtol=1e-10, atol=1e-14, msg=n)


# ----------------------------------------------------------------------------------------------------------------
# AUG: its classifiers replace the user's head, per-modality widths; the audio step moves only the audio side; ACA
# adds to the less confident modality
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("zero_grad", ["pytorch1", "pytorch2"])
def test_aug_mlp_unequal_widths_replace_the_head_and_alternate(blocks, zero_grad):
    blk = blocks["aug"]
    user = MLPModel(seed=2)
    model = blk.AUGClassifier(user.audio_net, user.visual_net, C, dim=(D_A, D_V))  # widths from the model
    assert model.audio_classifiers[0].in_features == D_A and model.visual_classifiers[0].in_features == D_V
    assert not set(map(id, user.head.parameters())) & set(map(id, model.parameters()))  # the user's head is unused
    assert blk.add_classifier(model, "visual").in_features == D_V
    with pytest.raises(ValueError, match="modality 'video' selects no classifiers; use 'audio' or 'visual'"):
        model.classifiers("video")
    with pytest.raises(ValueError, match="modality 'video'"):
        blk.add_classifier(model, "video")
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    audio = [*model.audio_net.parameters(), *model.audio_classifiers.parameters()]
    visual = [*model.visual_net.parameters(), *model.visual_classifiers[0].parameters()]
    snaps = []
    opt.register_step_post_hook(lambda o, a, k: snaps.append([p.detach().clone() for p in audio + visual]))
    before = [p.detach().clone() for p in audio + visual]
    x_a, x_v, y = make_data(64, seed=3)
    blk.aug_step(model, opt, x_a, x_v, y, 0.5, zero_grad=zero_grad)
    assert len(snaps) == 2
    moved = [[not torch.equal(p, q) for p, q in zip(s0, s1)] for s0, s1 in ((before, snaps[0]), (snaps[0], snaps[1]))]
    n = len(audio)
    assert all(moved[0][:n]) and not any(moved[0][n:])  # audio step: the audio encoder and classifier only
    assert all(moved[1][n:])  # visual step: the visual side
    # and the audio side too under PyTorch 1.11's zero_grad (the default: zero tensors keep momentum and decay going)
    assert all(moved[1][:n]) if zero_grad == "pytorch1" else not any(moved[1][:n])


@pytest.mark.parametrize("dominant,expected", [("audio", "visual"), ("visual", "audio")])
def test_aug_mlp_aca_adds_to_the_less_confident_modality(blocks, dominant, expected):
    blk = blocks["aug"]
    user = MLPModel(seed=3)
    model = blk.AUGClassifier(user.audio_net, user.visual_net, C, dim=(D_A, D_V))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    x_a, x_v, y = make_data(512, seed=4, dominant=dominant)
    for _ in range(3):  # one epoch's mean scores, after two epochs
        s_a = s_v = 0.0
        for i in range(0, 512, 32):
            out = blk.aug_step(model, opt, x_a[i : i + 32], x_v[i : i + 32], y[i : i + 32], 0.5)
            s_a, s_v = s_a + out["audio"]["score"] / 512, s_v + out["visual"]["score"] / 512
    action = blk.aca_decision(s_a, s_v, 1.0, 0.01)
    assert action == (1 if expected == "visual" else -1)
    blk.add_classifier(model, expected)
    assert len(model.classifiers(expected)) == 2 and len(model.classifiers(dominant)) == 1
    assert model.classifiers(expected)[1].in_features == (D_V if expected == "visual" else D_A)
