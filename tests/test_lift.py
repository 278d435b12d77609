"""Each method's ALGO LOGIC BLOCK, lifted out of its script with `conftest.load_block` (executed with nothing but
the builtins in scope, so it runs on its own imports), applied to a toy two-encoder model written here: the
property of the method (docs/ogm.md, docs/opm.md, docs/arl.md) holds through the lifted functions alone, as it
would in another project.

The toy: two small encoders (a 3x3 conv then a linear layer, so the 4-D "conv kernel" path of OGM is exercised),
a concat linear head to C classes, and a batch in which one modality's input carries the label and the other's is
noise; a few steps of joint training make the informative modality dominant.
"""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import block_source, exec_block, load_block

C, D, B = 4, 16, 64  # classes, feature size of each encoder, batch


class ToyEncoder(nn.Module):
    """8 input numbers -> (1, 2, 4) map -> Conv2d(1, 4, 3) -> ReLU -> Linear(32, D)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(32, D)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x.view(-1, 1, 2, 4))).flatten(1))


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.audio_net, self.visual_net, self.head = ToyEncoder(), ToyEncoder(), nn.Linear(2 * D, C)

    def forward(self, x_a, x_v):
        a, v = self.audio_net(x_a), self.visual_net(x_v)
        return a, v, self.head(torch.cat([a, v], 1))

    def unimodal_logits(self, a, v, bias):
        """The head's audio and visual halves; bias "half" (they sum to the fused logits) or "full" (zero-fill)."""
        w, b = self.head.weight, self.head.bias * (0.5 if bias == "half" else 1.0)
        return a @ w[:, :D].T + b, v @ w[:, D:].T + b


def toy_data(dominant, n=B, seed=0):
    """The dominant modality's input encodes the label (plus a little noise); the other's is pure noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % C
    informative = 2.0 * F.one_hot(y, 8).float() + 0.1 * torch.randn(n, 8, generator=g)
    noise = torch.randn(n, 8, generator=g)
    x_a, x_v = (informative, noise) if dominant == "audio" else (noise, informative)
    return x_a, x_v, y


def trained_toy(dominant, steps=60, seed=0):
    """Joint training (fused loss only) for a few steps: the informative modality becomes the dominant one."""
    torch.manual_seed(seed)
    model = Toy()
    x_a, x_v, y = toy_data(dominant, seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x_a, x_v)[2], y).backward()
        opt.step()
    model.zero_grad()
    return model, (x_a, x_v, y)


def encoder_grads(model):
    return {
        f"{role}.{n}": p.grad.clone()
        for role in ("audio_net", "visual_net", "head")
        for n, p in getattr(model, role).named_parameters()
    }


def true_class_prob_sum(z, y):
    return sum(torch.softmax(z[i], 0)[y[i]].item() for i in range(len(y)))


# ----------------------------------------------------------------------------------------------------------------
# load_block itself
# ----------------------------------------------------------------------------------------------------------------
def test_load_block_rejects_missing_imports_foreign_imports_missing_markers_and_foreign_names():
    good = (
        "x = 1\n# ALGO LOGIC BLOCK: toy\nimport math\n\nimport torch\n\n\ndef f(t):\n"
        "    return torch.relu(t) + math.pi\n# END ALGO LOGIC BLOCK\n"
    )
    blk = exec_block(block_source(good))
    assert blk.f(torch.tensor(-1.0)).item() == pytest.approx(math.pi)
    assert set(vars(blk)) == {"f", "math", "torch"}  # nothing but what the block imports and defines
    method_named_eval = good.replace("return torch.relu(t)", "return torch.nn.Identity().eval()(torch.relu(t))")
    assert exec_block(block_source(method_named_eval)).f(torch.tensor(-1.0)).item() == pytest.approx(math.pi)
    assert "x = 1" not in block_source(good)
    for bad, why in [
        (good.replace("# END ALGO LOGIC BLOCK\n", ""), "marker"),
        (good.replace("# ALGO LOGIC BLOCK: toy\n", ""), "marker"),
        (good + "# ALGO LOGIC BLOCK: again\n# END ALGO LOGIC BLOCK\n", "marker"),
        (good.replace("import math\n", ""), "neither imports nor defines: \\['math'\\]"),  # only builtins given
        (good.replace("import torch\n", ""), "neither imports nor defines: \\['torch'\\]"),
        (good.replace("import torch\n", "import numpy as np\nimport torch\n"), "imports 'numpy'"),
        (
            good.replace("import torch\n", "import torch\nfrom common.models import unimodal_logits\n"),
            "imports 'common.models'",
        ),
        (good.replace("import torch\n", "import torch\nfrom . import ogm\n"), "imports '.'"),
        (good.replace("import torch\n", "import torch\nimport importlib\n"), "imports 'importlib'"),
        (good.replace("def f(t):\n", "def f(t):\n    import copy\n"), "not at the top"),
        (good.replace("math.pi", "np.pi"), "neither imports nor defines"),  # a name from the rest of the script
        (good.replace("math.pi", "__import__('numpy').pi"), "__import__"),
        (good.replace("math.pi", "eval('1')"), "eval"),
        (good.replace("math.pi", "exec('y = 1') or 0"), "exec"),
        (good.replace("math.pi", "math.__builtins__"), "__builtins__"),
    ]:
        with pytest.raises(pytest.fail.Exception, match=why):
            exec_block(block_source(bad))


@pytest.mark.parametrize("script", ["ogm.py", "opm.py", "arl.py"])
def test_block_is_self_contained(script):
    """The block runs with nothing but the builtins and its own imports: no name is taken from the rest of the
    script."""
    blk = load_block(script)
    assert not set(vars(blk)) & {"np", "runs", "distributed", "unimodal_logits", "AVClassifier", "random"}


# ----------------------------------------------------------------------------------------------------------------
# OGM: the dominant encoder's gradients times k; GE noise with the std of the unscaled gradient
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ogm_blk():
    return load_block("ogm.py")


def ogm_step(blk, dominant, alpha=0.8):
    """One step of the toy as in the method's loop: forward, scores and k from the half-bias logits, backward."""
    model, (x_a, x_v, y) = trained_toy(dominant)
    a, v, z = model(x_a, x_v)
    with torch.no_grad():
        z_a, z_v = model.unimodal_logits(a, v, "half")
        torch.testing.assert_close(z_a + z_v, z)  # half-bias: the two halves sum to the fused logits
    s = blk.ogm_scores(z_a, z_v, y)
    assert not s.requires_grad
    assert s[0].item() == pytest.approx(true_class_prob_sum(z_a, y), rel=1e-5)
    assert s[1].item() == pytest.approx(true_class_prob_sum(z_v, y), rel=1e-5)
    k_a, k_v, audio_dominant = blk.ogm_coefficients(s[0], s[1], alpha)
    F.cross_entropy(z, y).backward()
    return model, s, (k_a, k_v, audio_dominant)


@pytest.mark.parametrize("dominant", ["audio", "visual"])
@pytest.mark.parametrize("params", ["conv", "nonbias"])
def test_ogm_dominant_gradients_times_k(ogm_blk, dominant, params):
    alpha = 0.8
    model, s, (k_a, k_v, audio_dominant) = ogm_step(ogm_blk, dominant, alpha)
    s_dom, s_weak = (s[0], s[1]) if dominant == "audio" else (s[1], s[0])
    assert s_dom > 1.5 * s_weak  # precondition: the informative modality does dominate
    k = 1 - math.tanh(alpha * (s_dom / s_weak).item())
    assert audio_dominant == (dominant == "audio")
    assert (k_a, k_v) == ((pytest.approx(k), 1.0) if dominant == "audio" else (1.0, pytest.approx(k)))
    assert 0 < k < 0.5
    k_dom = k_a if dominant == "audio" else k_v

    old = encoder_grads(model)
    ogm_blk.modulate_gradients(model.audio_net, model.visual_net, k_a, k_v, False, False, params=params)  # GE off
    new = encoder_grads(model)
    scaled = {f"{dominant}_net.conv.weight"} | ({f"{dominant}_net.fc.weight"} if params == "nonbias" else set())
    for n, g in old.items():
        assert g.abs().sum() > 0, n  # every gradient is non-zero, so "unchanged" and "scaled" can be told apart
        if n in scaled:
            torch.testing.assert_close(new[n], k_dom * g, rtol=1e-6, atol=0)
            nz = g != 0  # (dead ReLU units give exact zeros, which stay zero)
            assert nz.float().mean() > 0.5 and (new[n][nz] / g[nz]).sub(k_dom).abs().max() < 1e-5, n  # ratio == k
        else:  # the weak encoder, biases, the 2-D kernel in "conv" mode, the head (never passed)
            assert torch.equal(new[n], g), n


def pooled_ge_noise(blk, model, old, k_a, k_v, noise_a, noise_v, std_source, repeats=300):
    """Apply the modulation `repeats` times to the same gradients; per tensor, the residuals g_new - k g."""
    gen = torch.Generator().manual_seed(0)
    res = {n: [] for n in old}
    for _ in range(repeats):
        for role in ("audio_net", "visual_net", "head"):
            for n, p in getattr(model, role).named_parameters():
                p.grad = old[f"{role}.{n}"].clone()
        blk.modulate_gradients(model.audio_net, model.visual_net, k_a, k_v, noise_a, noise_v, gen, std_source)
        for n, g in encoder_grads(model).items():
            k = (k_a if n.startswith("audio_net") else k_v) if n.endswith("conv.weight") else 1.0  # 4-D kernels only
            res[n].append(g - k * old[n])
    return {n: torch.stack(r) for n, r in res.items()}


@pytest.mark.parametrize("dominant", ["audio", "visual"])
@pytest.mark.parametrize("std_source", ["unscaled", "scaled"])
def test_ogm_ge_noise_std(ogm_blk, dominant, std_source):
    """GE (target both): every conv-kernel gradient of both encoders gets fresh N(0, sigma^2) noise, sigma = the
    unbiased std of that tensor's unscaled gradient (+1e-8), or of k g with std_source "scaled"."""
    model, s, (k_a, k_v, audio_dominant) = ogm_step(ogm_blk, dominant)
    noise_a, noise_v = ogm_blk.ge_noise(True, "both", audio_dominant)
    assert (noise_a, noise_v) == (True, True)
    old = encoder_grads(model)
    res = pooled_ge_noise(ogm_blk, model, old, k_a, k_v, noise_a, noise_v, std_source)
    for n, r in res.items():
        if not n.endswith("conv.weight"):
            assert torch.all(r == 0), n  # biases, the 2-D kernels and the head: no noise, no scaling
            continue
        k = k_a if n.startswith("audio_net") else k_v
        sigma = (k if std_source == "scaled" else 1.0) * old[n].std().item() + 1e-8
        assert abs(r.mean().item()) < 0.1 * sigma, n  # 300 x 36 draws: the mean's std is sigma / 104
        assert r.std().item() / sigma == pytest.approx(1.0, abs=0.05), n  # (std of the ratio: about 0.007)
        assert not torch.equal(r[0], r[1]), n  # fresh noise at every call
    # k < 0.5 on the dominant side, so the two sources give sigmas at least 2x apart: the 5% check tells them apart


@pytest.mark.parametrize("dominant", ["audio", "visual"])
def test_ogm_ge_target_dominant(ogm_blk, dominant):
    """GE on the modulated encoder only: the weak encoder's gradients are bitwise unchanged."""
    model, s, (k_a, k_v, audio_dominant) = ogm_step(ogm_blk, dominant)
    noise_a, noise_v = ogm_blk.ge_noise(True, "dominant", audio_dominant)
    assert (noise_a, noise_v) == ((True, False) if dominant == "audio" else (False, True))
    assert ogm_blk.ge_noise(False, "both", audio_dominant) == (False, False)  # OGM without GE: no noise
    old = encoder_grads(model)
    ogm_blk.modulate_gradients(
        model.audio_net, model.visual_net, k_a, k_v, noise_a, noise_v, torch.Generator().manual_seed(0)
    )
    new = encoder_grads(model)
    weak = "visual_net." if dominant == "audio" else "audio_net."
    k_dom = k_a if dominant == "audio" else k_v
    for n, g in old.items():
        if n.startswith(weak) or not n.endswith("conv.weight"):
            assert torch.equal(new[n], g), n
        else:
            assert not torch.allclose(new[n], k_dom * g, rtol=1e-3, atol=0), n  # noise added on the dominant side


def test_ogm_window(ogm_blk):
    assert [ogm_blk.ogm_active(e, 0, 5) for e in range(7)] == [True] * 6 + [False]
    assert [ogm_blk.ogm_active(e, 0, 8, warmup_epochs=1) for e in (0, 1, 8, 9)] == [False, True, True, False]


# ----------------------------------------------------------------------------------------------------------------
# OPM: the dominant modality's features dropped at rate q, on a p_exe share of the steps; rescaled by 1 / (1 - theta)
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def opm_blk():
    return load_block("opm.py")


def opm_features(blk, dominant, q_base=0.5, lam=0.5):
    model, (x_a, x_v, y) = trained_toy(dominant)
    a, v, _ = model(x_a, x_v)
    with torch.no_grad():
        z_a, z_v = model.unimodal_logits(a, v, "half")
    s = blk.opm_scores(z_a, z_v, y)
    assert s[0].item() == pytest.approx(true_class_prob_sum(z_a, y), rel=1e-5)
    assert s[1].item() == pytest.approx(true_class_prob_sum(z_v, y), rel=1e-5)
    q_a, q_v = blk.drop_probabilities(s[0].item(), s[1].item(), q_base, lam)
    return model, a, v, y, s, (q_a, q_v)


@pytest.mark.parametrize("dominant", ["audio", "visual"])
def test_opm_drops_the_dominant_modality_at_rate_q(opm_blk, dominant):
    q_base, lam, p_exe, n_steps = 0.5, 0.5, 0.7, 400
    model, a, v, y, s, (q_a, q_v) = opm_features(opm_blk, dominant, q_base, lam)
    s_dom, s_weak = (s[0], s[1]) if dominant == "audio" else (s[1], s[0])
    assert s_dom > 1.5 * s_weak  # precondition
    q = q_base * (1 + lam * math.tanh((s_dom / s_weak).item() - 1))
    assert (q_a, q_v) == ((pytest.approx(q), 0.0) if dominant == "audio" else (0.0, pytest.approx(q)))
    assert q > 0.55
    factor = 1 / (1 - q / 2)  # 1 / (1 - theta), theta = mean(q_a, q_v)
    assert opm_blk.rescale_factors(q_a, q_v) == (pytest.approx(factor), pytest.approx(factor))

    gen = torch.Generator().manual_seed(0)
    a, v = a.detach(), v.detach()
    executed, zeroed, seen = 0, 0, 0
    for _ in range(n_steps):
        a_t, v_t, y_t, ex, (frac_a, frac_v) = opm_blk.opm_drop(a, v, y, q_a, q_v, p_exe, gen)
        if not ex:
            assert a_t is a and v_t is v and y_t is y and (frac_a, frac_v) == (0.0, 0.0)
            continue
        executed += 1
        assert torch.equal(y_t, y)  # the weak side is never dropped, so no sample is removed
        dom_t, dom, weak_t, weak = (a_t, a, v_t, v) if dominant == "audio" else (v_t, v, a_t, a)
        gone = dom_t.abs().sum(1) == 0
        zeroed, seen = zeroed + int(gone.sum()), seen + len(y)
        assert (frac_a if dominant == "audio" else frac_v) == pytest.approx(gone.float().mean().item())
        assert (frac_v if dominant == "audio" else frac_a) == 0.0
        assert weak_t.abs().sum(1).min() > 0  # no weak row zeroed
        torch.testing.assert_close(weak_t, weak * factor)  # the weak side is rescaled too
        torch.testing.assert_close(dom_t[~gone], dom[~gone] * factor)
    assert abs(executed / n_steps - p_exe) < 0.07  # 400 Bernoulli(0.7) steps: std 0.023
    # about 280 x 64 = 18,000 per-sample draws: the std of the zeroed share is about 0.004
    assert abs(zeroed / seen - q) < 0.02


def test_opm_no_drop_on_a_tie_or_before_the_warmup(opm_blk):
    assert opm_blk.drop_probabilities(3.0, 3.0, 0.5, 0.5) == (0.0, 0.0)
    assert [opm_blk.opm_active(e, 1) for e in (0, 1, 9)] == [False, True, True]
    assert [opm_blk.opm_active(e, 0, (2, 3)) for e in (1, 2, 3, 4)] == [False, True, True, False]


def test_opm_dropped_samples_send_no_gradient_and_empty_samples_are_removed(opm_blk):
    model, a, v, y, s, (q_a, q_v) = opm_features(opm_blk, "audio")
    keep_a, keep_v = torch.tensor([1.0, 0.0] * (B // 2)), torch.ones(B)
    a_t, v_t, y_t = opm_blk.drop_features(a, v, y, keep_a, keep_v, q_a, q_v)
    F.cross_entropy(model.head(torch.cat([a_t, v_t], 1)), y_t).backward()
    w = model.audio_net.fc.weight.grad  # only the kept half of the samples reaches the audio encoder
    model.zero_grad()
    a2, v2, _ = model(*toy_data("audio")[:2])
    f = opm_blk.rescale_factors(q_a, q_v)[0]
    F.cross_entropy(model.head(torch.cat([a2 * keep_a[:, None] * f, v2 * f], 1)), y).backward()
    torch.testing.assert_close(w, model.audio_net.fc.weight.grad)
    # both sides dropped for a sample: it is removed
    a_t, v_t, y_t = opm_blk.drop_features(
        a, v, y, torch.tensor([0.0, 1] * (B // 2)), torch.tensor([0.0, 0] * (B // 2)), 0.5, 0.5, rescale="none"
    )
    assert torch.equal(y_t, y[1::2]) and a_t.shape == (B // 2, D) and torch.all(v_t == 0)


def test_opm_split_batch_draws_the_masks_of_one_big_batch(opm_blk):
    """world_size 2: rank r keeps rows r*B .. (r+1)*B - 1 of the masks of the global batch."""
    a, v, y = torch.randn(2 * B, D) + 3, torch.randn(2 * B, D) + 3, torch.arange(2 * B) % C
    gen = torch.Generator().manual_seed(5)
    state = gen.get_state()
    whole = opm_blk.opm_drop(a, v, y, 0.6, 0.0, 1.0, gen)
    parts = []
    for rank in (0, 1):
        gen.set_state(state)
        parts.append(
            opm_blk.opm_drop(
                a[rank * B : (rank + 1) * B],
                v[rank * B : (rank + 1) * B],
                y[rank * B : (rank + 1) * B],
                0.6,
                0.0,
                1.0,
                gen,
                world_size=2,
                rank=rank,
            )
        )
    torch.testing.assert_close(torch.cat([p[0] for p in parts]), whole[0])
    assert not torch.equal(parts[0][0].abs().sum(1) == 0, parts[1][0].abs().sum(1) == 0)  # different rows


# ----------------------------------------------------------------------------------------------------------------
# ARL: encoder gradients times 1 + c_m; the larger c for the side whose dependence share is below its
# inverse-variance share
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def arl_blk():
    return load_block("arl.py")


def arl_step_grads(blk, model, batch, coeff, how, gamma=4.0):
    """Forward with GradScale (or GradScale on Coefficients set after the forward pass, or neither), zero-fill
    logits, ARL's loss, backward."""
    x_a, x_v, y = batch
    model.zero_grad()
    a, v = model.audio_net(x_a), model.visual_net(x_v)
    late = (blk.Coefficient(), blk.Coefficient())
    if how == "gradscale":
        a, v = blk.GradScale.apply(a, coeff[0]), blk.GradScale.apply(v, coeff[1])
    elif how == "late":
        a, v = blk.GradScale.apply(a, late[0]), blk.GradScale.apply(v, late[1])
    z = model.head(torch.cat([a, v], 1))
    z_a, z_v = model.unimodal_logits(a, v, "full")
    loss, loss_f, loss_a, loss_v = blk.arl_loss(z, z_a, z_v, y, gamma)
    late[0].value, late[1].value = coeff  # read only by the backward pass
    want = F.cross_entropy(z, y) + gamma * (F.cross_entropy(z_a, y) + F.cross_entropy(z_v, y))
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    loss.backward()
    return encoder_grads(model)


@pytest.mark.parametrize("how", ["gradscale", "late"])
@pytest.mark.parametrize("coeff", [(0.8, 0.2), (0.1, 0.9)])
def test_arl_encoder_gradients_times_one_plus_c(arl_blk, how, coeff):
    model, batch = trained_toy("audio")
    model = model.double()
    batch = (batch[0].double(), batch[1].double(), batch[2])
    ref = arl_step_grads(arl_blk, model, batch, (0.0, 0.0), "none")
    got = arl_step_grads(arl_blk, model, batch, coeff, how)
    for n, g in ref.items():
        assert g.abs().sum() > 0, n
        s = 1 + coeff[0] if n.startswith("audio_net") else 1 + coeff[1] if n.startswith("visual_net") else 1.0
        torch.testing.assert_close(got[n], s * g, rtol=1e-9, atol=1e-15)


def test_arl_gradscale_is_identity_forward_and_constant_w(arl_blk):
    x = torch.randn(5, D, requires_grad=True)
    w = torch.tensor(0.7, requires_grad=True)
    out = arl_blk.GradScale.apply(x, w)
    assert torch.equal(out, x)
    out.backward(torch.ones(5, D))
    assert torch.equal(x.grad, torch.full((5, D), 1.7)) and w.grad is None


def reference_shares(z_a, z_v, floor=0.3):
    """d_a from the batch-mean |logit| summed over classes, w_a from the inverse of the floored entropy shares."""
    dep_a, dep_v = z_a.abs().mean(0).sum().item(), z_v.abs().mean(0).sum().item()
    ent = [-(torch.softmax(z, 1) * torch.log_softmax(z, 1)).sum(1).mean().item() for z in (z_a, z_v)]
    h_a, h_v = max(ent[0] / sum(ent), floor), max(ent[1] / sum(ent), floor)
    return dep_a / (dep_a + dep_v), (1 / h_a) / (1 / h_a + 1 / h_v)


def test_arl_coefficients_boost_the_under_relied_upon_side(arl_blk):
    """On the toy's zero-fill logits, rescaled to move the dependence and entropy shares both ways: c_a > c_v exactly
    when d_a < w_a, c_a = sigmoid(T (w_a - d_a)), and both outcomes occur."""
    model, (x_a, x_v, y) = trained_toy("audio")
    with torch.no_grad():
        a, v, _ = model(x_a, x_v)
        z_a0, z_v0 = model.unimodal_logits(a, v, "full")
    T, outcomes = 8.0, set()
    for s_a, s_v in [(1, 1), (0.1, 1), (0.3, 1), (1, 3), (1, 10), (1, 0.1), (3, 1), (0.05, 0.05)]:
        z_a, z_v = z_a0 * s_a, z_v0 * s_v
        d_a, w_a = reference_shares(z_a, z_v)
        r = arl_blk.arl_coefficients(z_a, z_v, T)
        assert r["d_a"].item() == pytest.approx(d_a, abs=1e-5) and r["w_a"].item() == pytest.approx(w_a, abs=1e-5)
        assert (r["c_a"] + r["c_v"]).item() == pytest.approx(1.0, abs=1e-6)
        assert r["c_a"].item() == pytest.approx(1 / (1 + math.exp(-T * (w_a - d_a))), abs=1e-5)
        if abs(w_a - d_a) > 1e-3:
            assert (r["c_a"] > r["c_v"]) == (d_a < w_a), (s_a, s_v)
            outcomes.add(bool(d_a < w_a))
    assert outcomes == {True, False}
    # the trained toy as it is: audio is relied upon more than its reliability share, so visual is boosted
    r = arl_blk.arl_coefficients(z_a0, z_v0, T)
    assert r["d_a"] > r["w_a"] and r["c_v"] > r["c_a"]
