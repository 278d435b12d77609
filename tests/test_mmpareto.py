"""MMPareto (mmpareto.py, docs/mmpareto.md): the properties of the spec (numbered §8.1-8.13 as in docs/mmpareto.md's
"Tests"), on the ALGO LOGIC BLOCK alone (loaded as tests/conftest.py's load_block does: only its own imports in scope)
and on the script's loop; the lift tests (the block on a conv toy and on MLP encoders with a plain nn.Linear head,
against a transcription of the release's step); the DDP reduction; and why BalanceBenchmark's trainer is not a
reference. The release: GeWu-Lab/MMPareto_ICML2024 at a339db3 (code/MMPareto.py, code/min_norm_solvers.py).
"""

import copy
import json
import os
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import ckpt, history, load_block, run_inproc, same_state
from mmpareto_toy import TwoEncoderModel, batches, max_param_diff

import mmpareto


@pytest.fixture(scope="module")
def blk():
    return load_block("mmpareto.py")


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def roles(model):
    return (
        list(model.audio_net.parameters()),
        list(model.visual_net.parameters()),
        list(model.head.parameters()),
        list(model.head_audio.parameters()),
        list(model.head_video.parameters()),
    )


def block_grads(blk, model, x_a, x_v, y, gamma=1.5, rescale="tensor", combine="mmpareto", reduce=lambda t: t):
    """The planned loop lines of mmpareto.py: one forward, three gradients, the global batch's, the combination per
    encoder; returns (list of (param, new grad), stats audio, stats visual, (g_m, g_a, g_v))."""
    a, v, z, z_a, z_v = model(x_a, x_v)
    loss_m, loss_a, loss_v = F.cross_entropy(z, y), F.cross_entropy(z_a, y), F.cross_entropy(z_v, y)
    enc_a, enc_v, head, h_a, h_v = roles(model)
    g_m = blk.task_grads(loss_m, enc_a + enc_v + head)
    g_a = blk.task_grads(loss_a, enc_a + h_a)
    g_v = blk.task_grads(loss_v, enc_v + h_v, retain_graph=False)
    g_m, g_a, g_v = blk.global_mean_grads([g_m, g_a, g_v], y.shape[0], reduce)
    na, nv = len(enc_a), len(enc_v)
    new_a, st_a = blk.mmpareto_encoder_grads(g_m[:na], g_a[:na], gamma, rescale, combine)
    new_v, st_v = blk.mmpareto_encoder_grads(g_m[na : na + nv], g_v[:nv], gamma, rescale, combine)
    params = enc_a + enc_v + head + h_a + h_v
    grads = new_a + new_v + g_m[na + nv :] + g_a[na:] + g_v[nv:]
    return params, grads, st_a, st_v, (g_m, g_a, g_v)


def block_step(blk, model, opt, batch, **kw):
    params, grads, st_a, st_v, _ = block_grads(blk, model, *batch, **kw)
    opt.zero_grad()
    blk.set_grads(params, grads)
    opt.step()
    return st_a, st_v


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)


def aligned(model, sign=1.0, scale=0.05):
    """Small head weights, the fused head's halves = sign x the unimodal heads: near-uniform predictions make the
    fused and unimodal feature gradients parallel (sign +1: cos > 0 on both encoders) or opposite (-1: conflict)."""
    d = model.dims[0]
    with torch.no_grad():
        model.head_audio.weight.mul_(scale)
        model.head_video.weight.mul_(scale)
        model.head.weight[:, :d] = sign * model.head_audio.weight
        model.head.weight[:, d:] = sign * model.head_video.weight
        for b in (model.head.bias, model.head_audio.bias, model.head_video.bias):
            b.zero_()
    return model


# ----------------------------------------------------------------------------------------------------------------
# the block on its own
# ----------------------------------------------------------------------------------------------------------------
def test_block_is_self_contained(blk):
    assert {
        "task_grads",
        "global_mean_grads",
        "min_norm_weight",
        "mmpareto_weights",
        "mmpareto_combine",
        "mmpareto_encoder_grads",
        "set_grads",
    } <= set(vars(blk))


# §8.1
def test_solver_worked_example(blk):
    g_m, g_u = [t(1, 0)], [t(-1, 2)]
    alpha, cos = blk.mmpareto_weights(g_m, g_u)
    assert float(alpha) == pytest.approx(0.75, abs=1e-15) and cos < 0
    d = alpha * g_m[0] + (1 - alpha) * g_u[0]
    torch.testing.assert_close(d, t(0.5, 0.5))
    assert float(d @ g_m[0]) == pytest.approx(0.5) and float(d @ g_u[0]) == pytest.approx(0.5)
    (grad,), stats = blk.mmpareto_encoder_grads(g_m, g_u)
    torch.testing.assert_close(grad, t(1.5 * 2**0.5, 1.5 * 2**0.5))
    assert float(grad.norm()) == pytest.approx(3.0) == 1.5 * float((g_m[0] + g_u[0]).norm())
    assert stats["conflict"] == 1.0 and stats["alpha_m"] == pytest.approx(0.75)


# §8.1
def test_solver_matches_grid_search(blk):
    g = torch.Generator().manual_seed(0)
    grid = torch.linspace(0, 1, 10001, dtype=torch.float64)
    checked = 0
    while checked < 50:
        g_m, g_u = torch.randn(7, generator=g, dtype=torch.float64), torch.randn(7, generator=g, dtype=torch.float64)
        g_u = g_u * float(torch.rand(1, generator=g) * 5)  # unequal norms
        if g_m @ g_u >= 0:
            continue
        alpha, _ = blk.mmpareto_weights([g_m], [g_u])
        norms = (grid[:, None] * g_m + (1 - grid[:, None]) * g_u).norm(dim=1)
        assert abs(float(alpha) - float(grid[norms.argmin()])) <= 1e-3
        d = alpha * g_m + (1 - alpha) * g_u
        assert float(d @ g_m) == pytest.approx(float(d @ g_u), rel=1e-5) and float(d @ g_m) >= 0
        checked += 1


def test_logged_cosine(blk):
    """cos = q / sqrt(max(p r, 1e-16)), F.cosine_similarity's eps 1e-8 on the product of the norms (MMPareto.py
    L149-150): the true cosine at every gradient scale that occurs; only its sign decides, its value is logged."""
    g = torch.Generator().manual_seed(3)
    for scale in (1e-3, 1.0, 1e3):
        g_m = [scale * torch.randn(3, 2, generator=g, dtype=torch.float64) for _ in range(2)]
        g_u = [scale * torch.randn(3, 2, generator=g, dtype=torch.float64) for _ in range(2)]
        _, cos = blk.mmpareto_weights(g_m, g_u)
        a, b = torch.cat([x.flatten() for x in g_m]), torch.cat([x.flatten() for x in g_u])
        assert float(cos) == pytest.approx(float(a @ b / (a.norm() * b.norm())), rel=1e-12)


# §8.2
def test_common_direction(blk):
    g = torch.Generator().manual_seed(1)
    seen = 0
    while seen < 50:
        g_m = torch.randn(5, generator=g, dtype=torch.float64)
        g_u = 3 * torch.randn(5, generator=g, dtype=torch.float64)
        if g_m @ g_u >= 0:
            continue
        (grad,), stats = blk.mmpareto_encoder_grads([g_m], [g_u])
        assert stats["conflict"] == 1.0
        assert float(grad @ g_m) >= -1e-12 and float(grad @ g_u) >= -1e-12
        # the plain sum would have descended on only one of them in some of these pairs; MMPareto never
        seen += 1


# §8.3
def test_no_conflict_worked_example(blk):
    (grad,), stats = blk.mmpareto_encoder_grads([t(1, 0)], [t(1, 1)])
    torch.testing.assert_close(grad, t(3, 1.5))
    assert stats["conflict"] == 0.0 and stats["alpha_m"] == 0.5


# §8.3
def test_no_conflict_model_step_is_the_sum_times_gamma(blk):
    model = aligned(TwoEncoderModel("conv", seed=3).double())
    params, grads, st_a, st_v, (g_m, g_a, g_v) = block_grads(blk, model, *batches(1, seed=3)[0])
    assert st_a["cos"] > 0 and st_v["cos"] > 0  # precondition
    na, nv = len(list(model.audio_net.parameters())), len(list(model.visual_net.parameters()))
    for i in range(na):
        torch.testing.assert_close(grads[i], 1.5 * (g_m[i] + g_a[i]), rtol=1e-6, atol=0)
    for i in range(nv):
        torch.testing.assert_close(grads[na + i], 1.5 * (g_m[na + i] + g_v[i]), rtol=1e-6, atol=0)


# §8.4
def test_gamma_one_without_conflict_is_the_uniform_baseline(blk):
    base = aligned(TwoEncoderModel("conv", seed=3).double())
    m1, m2 = copy.deepcopy(base), copy.deepcopy(base)
    o1, o2 = sgd(m1), sgd(m2)
    batch = batches(1, seed=3)[0]
    st_a, st_v = block_step(blk, m1, o1, batch, gamma=1.0)
    assert st_a["cos"] > 0 and st_v["cos"] > 0
    block_step(blk, m2, o2, batch, combine="uniform")
    assert max_param_diff(m1, m2) <= 1e-7
    # and the release's uniform baseline is backward(L_m + L_a + L_v) (uniform_baseline.py L71-85)
    m3 = copy.deepcopy(base)
    o3 = sgd(m3)
    _, _, z, z_a, z_v = m3(*batch[:2])
    o3.zero_grad()
    (F.cross_entropy(z, batch[2]) + F.cross_entropy(z_a, batch[2]) + F.cross_entropy(z_v, batch[2])).backward()
    o3.step()
    assert max_param_diff(m2, m3) <= 1e-12


# §8.5
def test_zero_gradient_edge_cases(blk):
    g = t(1, -2, 0.5)
    z = torch.zeros(3, dtype=torch.float64)
    alpha, _ = blk.mmpareto_weights([z], [g])
    assert float(alpha) == 0.999
    (grad,), _ = blk.mmpareto_encoder_grads([z], [g])
    torch.testing.assert_close(grad, 1.5 * g)
    alpha, _ = blk.mmpareto_weights([g], [z])
    assert float(alpha) == 0.001
    (grad,), _ = blk.mmpareto_encoder_grads([g], [z])
    torch.testing.assert_close(grad, 1.5 * g)
    (grad,), stats = blk.mmpareto_encoder_grads([z], [z])
    assert torch.equal(grad, z) and all(v == v for v in stats.values())  # no NaN anywhere
    assert stats["rescale"] == 1.0  # a zero tensor counts as not rescaled in the logged mean


def test_zero_combined_tensor_gives_zero_where_the_release_gives_nan(blk):
    """A tensor whose n_t is 0 while the plain sum is not (alpha 0.75, g_u,t = -3 g_m,t): the release's
    diff = three_norm / new_norm is inf and inf * 0 = NaN (MMPareto.py L190-195); the block gives 0."""
    g_m, g_u = t(1.0, 0.0), t(-3.0, 0.0)
    (grad,), _ = blk.mmpareto_combine([g_m], [g_u], 0.75)
    assert torch.equal(grad, torch.zeros(2, dtype=torch.float64))
    new = 2 * 0.75 * g_m + 2 * 0.25 * g_u  # MMPareto.py L191
    diff = torch.norm(g_m + g_u) / torch.norm(new)  # L190-193
    assert torch.isnan(diff * new * 1.5).all()  # L194-195


# §8.6
@pytest.mark.parametrize("kind", ["conv", "mlp"])
def test_per_tensor_magnitude(blk, kind):
    model = aligned(TwoEncoderModel(kind, seed=4).double(), sign=-1.0, scale=0.5)
    _, grads, st_a, st_v, (g_m, g_a, g_v) = block_grads(blk, model, *batches(1, seed=4)[0])
    na = len(list(model.audio_net.parameters()))
    assert st_a["conflict"] == 1.0  # precondition: a conflict step
    alpha = st_a["alpha_m"]
    below = 0
    for gm, gu, out in zip(g_m[:na], g_a[:na], grads[:na]):
        n = 2 * alpha * gm + 2 * (1 - alpha) * gu
        expected = 1.5 * max(float((gm + gu).norm()), float(n.norm()))
        assert float(out.norm()) == pytest.approx(expected, rel=1e-9)
        c = float(out @ n if out.dim() == 1 else (out * n).sum()) / float((n * n).sum())
        torch.testing.assert_close(out, c * n, rtol=1e-9, atol=1e-15)
        assert c > 0
        below += float((gm + gu).norm()) < float(n.norm())
    # global: one rho for the whole encoder, norm 1.5 ||G_m + G_u||
    _, grads_g, _, _, _ = block_grads(blk, model, *batches(1, seed=4)[0], rescale="global")
    total = torch.sqrt(sum((o * o).sum() for o in grads_g[:na]))
    plain = torch.sqrt(sum(((a + b) ** 2).sum() for a, b in zip(g_m[:na], g_a[:na])))
    assert float(total) == pytest.approx(1.5 * float(plain), rel=1e-9)


def test_per_tensor_rescale_can_leave_a_tensor_below_the_plain_sum(blk):
    """rho_t < 1 happens tensor by tensor (the spec: 3 of 60 ResNet18 tensors at init): the update then keeps
    gamma ||n_t|| > gamma ||g_m,t + g_u,t||, so the rescale only ever enlarges."""
    g_m = [t(1.0, 0.0), t(0.0, 1.0)]
    g_u = [t(-1.0, 2.0), t(0.0, -0.9)]  # second tensor: its plain sum (0, 0.1) is short
    grads, _ = blk.mmpareto_encoder_grads(g_m, g_u)
    alpha, _ = blk.mmpareto_weights(g_m, g_u)
    n2 = 2 * alpha * g_m[1] + 2 * (1 - alpha) * g_u[1]
    assert float(n2.norm()) > float((g_m[1] + g_u[1]).norm())
    torch.testing.assert_close(grads[1], 1.5 * n2)


def test_combine_defaults_are_the_releases(blk):
    """mmpareto_combine's defaults are the release's: gamma 1.5, per tensor (MMPareto.py L178, L184-207), on two
    tensors where a per-tensor and a global rescale differ."""
    g_m, g_u = [t(1.0, 0.0), t(0.0, 1.0)], [t(-1.0, 2.0), t(0.0, -0.9)]
    alpha, _ = blk.mmpareto_weights(g_m, g_u)
    grads, rescale = blk.mmpareto_combine(g_m, g_u, alpha)
    rhos = []
    for out, a, b in zip(grads, g_m, g_u):
        n = 2 * alpha * a + 2 * (1 - alpha) * b
        rhos.append(float((a + b).norm() / n.norm()))
        torch.testing.assert_close(out, 1.5 * max(rhos[-1], 1.0) * n, rtol=1e-12, atol=0)
    assert min(rhos) < 1 < max(rhos) and rescale == pytest.approx((max(rhos) + 1) / 2)


# §8.7
def test_whole_encoder_decision_follows_the_concatenated_cosine(blk):
    """Shapes of a conv + BN + Linear encoder; the conv and Linear gradients agree, the BN bias conflicts strongly:
    the whole-encoder cosine is negative, so the min-norm branch is taken although most tensors agree."""
    shapes = [(4, 1, 3, 3), (4,), (4,), (4,), (6, 32), (6,)]
    g = torch.Generator().manual_seed(2)
    g_m = [0.01 * torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    g_u = [gm.clone() for gm in g_m]
    g_m[3] = t(10.0, 0, 0, 0)
    g_u[3] = t(-20.0, 0, 0, 0)  # BN bias: opposite and large (unequal norms, so the min-norm weight is not 1/2)
    alpha, cos = blk.mmpareto_weights(g_m, g_u)
    assert cos < 0 and float(alpha) == pytest.approx(2 / 3, abs=1e-3)
    no_bn = [i for i in range(6) if i != 3]
    alpha2, cos2 = blk.mmpareto_weights([g_m[i] for i in no_bn], [g_u[i] for i in no_bn])
    assert cos2 > 0 and alpha2 == 0.5  # without the BN tensor the decision would flip
    # and the other way round: one conflicting layer, the whole vector agrees
    g_u[3] = t(10.0, 0, 0, 0)
    g_u[0] = -g_m[0]
    alpha, cos = blk.mmpareto_weights(g_m, g_u)
    assert float((g_m[0] * g_u[0]).sum()) < 0 and cos > 0 and alpha == 0.5


# §8.8
def test_heads_keep_their_own_loss_gradient(blk):
    model = TwoEncoderModel("conv", seed=5).double()
    batch = batches(1, seed=5)[0]
    params, grads, _, _, (g_m, g_a, g_v) = block_grads(blk, model, *batch)
    enc_a, enc_v, head, h_a, h_v = roles(model)
    _, _, z, z_a, z_v = model(*batch[:2])
    y = batch[2]
    ref_head = torch.autograd.grad(F.cross_entropy(z, y), head, retain_graph=True)
    ref_ha = torch.autograd.grad(F.cross_entropy(z_a, y), h_a + enc_v, retain_graph=True, allow_unused=True)
    ref_hv = torch.autograd.grad(F.cross_entropy(z_v, y), h_v)
    got = dict(zip(map(id, params), grads))
    for p, r in zip(head, ref_head):
        torch.testing.assert_close(got[id(p)], r, rtol=1e-12, atol=0)
    for p, r in zip(h_a, ref_ha[: len(h_a)]):
        torch.testing.assert_close(got[id(p)], r, rtol=1e-12, atol=0)
    for p, r in zip(h_v, ref_hv):
        torch.testing.assert_close(got[id(p)], r, rtol=1e-12, atol=0)
    assert all(r is None for r in ref_ha[len(h_a) :])  # L_a has no path to the visual encoder
    assert all(float(g.abs().max()) == 0 for g in blk.task_grads(F.cross_entropy(z_a, y), enc_v))


# §8.10
def test_one_forward_per_step(blk):
    model = TwoEncoderModel("conv", seed=6).double()
    opt = sgd(model)
    for i, batch in enumerate(batches(3, seed=6)):
        before = (int(model.audio_net.bn.num_batches_tracked), int(model.visual_net.bn.num_batches_tracked))
        block_step(blk, model, opt, batch)
        assert (int(model.audio_net.bn.num_batches_tracked), int(model.visual_net.bn.num_batches_tracked)) == (
            before[0] + 1,
            before[1] + 1,
        )


# §8.13 (the block part: the loop's logging is the script's)
def test_smoke_imbalanced_toy(blk):
    model = TwoEncoderModel("conv", seed=7)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    stats = [block_step(blk, model, opt, b) for b in batches(40, seed=7, dtype=torch.float32)]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    conflict = [s["conflict"] for pair in stats for s in pair]
    alphas = [s["alpha_m"] for pair in stats for s in pair]
    assert 0 < sum(conflict) < len(conflict)  # both branches occur
    # interior min-norm weights can fall outside [0.001, 0.999], and in float32 round to exactly 1 when ||G_m|| is
    # tiny next to ||G_u|| (then n = 2 g_m and rho_t reaches 1e9, the update's norm staying 1.5 ||g_m,t + g_u,t||)
    assert all(0 <= a <= 1 for a in alphas)
    assert all(s["rescale"] >= 1.0 for pair in stats for s in pair)


def test_ablations_uniform_and_mgda(blk):
    g_m, g_u = [t(1.0, 0.0)], [t(1.0, 1.0)]  # no conflict
    (u,), _ = blk.mmpareto_encoder_grads(g_m, g_u, combine="uniform")
    torch.testing.assert_close(u, t(2.0, 1.0))
    (m,), st = blk.mmpareto_encoder_grads(g_m, g_u, combine="mgda")
    # q = 1 >= p = 1: the solver's end point 0.999 even without conflict, and no rescale: mostly g_m
    assert st["alpha_m"] == 0.999
    torch.testing.assert_close(m, 0.999 * g_m[0] + 0.001 * g_u[0])


def test_ablation_stats_and_an_exact_orthogonal_pair(blk):
    """The logged stats of the ablations: uniform is the plain sum (alpha_m 1/2, no rescale), mgda never rescales;
    cos exactly 0 is a conflict, as in the release (MMPareto.py L164-172: equal weights only when cos > 0)."""
    g_m, g_u = [t(1.0, 0.0)], [t(0.0, 2.0)]  # orthogonal: cos = 0 exactly
    _, st = blk.mmpareto_encoder_grads(g_m, g_u, combine="uniform")
    assert (st["alpha_m"], st["rescale"]) == (0.5, 1.0)
    (m,), st = blk.mmpareto_encoder_grads(g_m, g_u, combine="mgda")
    assert st["rescale"] == 1.0 and st["conflict"] == 1.0 and st["alpha_m"] == pytest.approx(0.8)
    (d,), st = blk.mmpareto_encoder_grads(g_m, g_u)
    assert st["cos"] == 0.0 and st["conflict"] == 1.0 and st["alpha_m"] == pytest.approx(0.8)  # min-norm, not 1/2
    torch.testing.assert_close(d, 1.5 * t(1.6, 0.8) * (5**0.5 / (1.6**2 + 0.8**2) ** 0.5), rtol=1e-12, atol=0)


def test_unknown_combine_or_rescale_is_an_error(blk):
    """A misspelt mode is refused, not run as the default (the block is meant to be pasted into other code)."""
    g = [t(1.0, 0.0)]
    for kw in (dict(combine="pareto"), dict(rescale="layer")):
        with pytest.raises(ValueError, match="combine must be"):
            blk.mmpareto_encoder_grads(g, g, **kw)


def test_set_grads_stores_detached_gradients(blk):
    """p.grad is a plain tensor even when the gradient given carries a graph (optimizer.step must not extend it)."""
    p = torch.nn.Parameter(torch.zeros(2))
    x = torch.ones(2, requires_grad=True)
    blk.set_grads([p], [x * 3])
    assert not p.grad.requires_grad and p.grad.grad_fn is None
    torch.testing.assert_close(p.grad, torch.full((2,), 3.0))


# ----------------------------------------------------------------------------------------------------------------
# §8.9 release parity: the release's step transcribed (MMPareto_ICML2024 a339db3), float64, >= 3 steps
# ----------------------------------------------------------------------------------------------------------------
def release_min_norm(vecs):
    """min_norm_solvers.py L92-129 for two lists (n < 3 returns after the two-point solution)."""
    dps = {}
    for i, j in ((0, 1), (0, 0), (1, 1)):  # L39-53: (i, j) first, then (i, i), (j, j)
        dps[i, j] = 0.0
        for k in range(len(vecs[i])):  # every entry of the list, the "concat" copy included (L43-44)
            dps[i, j] += torch.mul(vecs[i][k], vecs[j][k]).sum()
    v1v1, v1v2, v2v2 = dps[0, 0], dps[0, 1], dps[1, 1]
    if v1v2 >= v1v1:  # L17-21
        c = 0.999
    elif v1v2 >= v2v2:  # L22-26
        c = 0.001
    else:
        c = -1.0 * ((v1v2 - v2v2) / (v1v1 + v2v2 - 2 * v1v2))  # L28
    return [c, 1 - c]  # L122-129: sol_vec[0] = c (the first list: the fused loss), sol_vec[1] = 1 - c


def release_step(model, opt, x_a, x_v, y, set_to_none):
    """code/MMPareto.py train_epoch, one batch."""
    audio = [(n, p) for n, p in model.named_parameters() if "head" not in n and "audio" in n]  # L74-84
    visual = [(n, p) for n, p in model.named_parameters() if "head" not in n and "audio" not in n and "visual" in n]
    opt.zero_grad(set_to_none=set_to_none)  # L93
    out, out_a, out_v = model(x_a, x_v)[2:]  # L97
    losses = [F.cross_entropy(out, y), F.cross_entropy(out_a, y), F.cross_entropy(out_v, y)]  # L99-103, L110
    rec_a, rec_v = {}, {}
    for kind, loss in zip(("both", "audio", "visual"), losses):  # L111-117
        loss.backward(retain_graph=True)  # L119
        if kind in ("both", "audio"):  # L128-140: clones of the audio encoder's gradients, then their concatenation
            rec_a[kind] = {n: p.grad.data.clone() for n, p in audio}
            rec_a[kind]["concat"] = torch.cat([rec_a[kind][n].flatten() for n, _ in audio])
        if kind in ("both", "visual"):  # L121-126, L141-145
            rec_v[kind] = {n: p.grad.data.clone() for n, p in visual}
            rec_v[kind]["concat"] = torch.cat([rec_v[kind][n].flatten() for n, _ in visual])
        opt.zero_grad(set_to_none=set_to_none)  # L147
    cos_a = F.cosine_similarity(rec_a["both"]["concat"], rec_a["audio"]["concat"], dim=0)  # L149
    cos_v = F.cosine_similarity(rec_v["both"]["concat"], rec_v["visual"]["concat"], dim=0)  # L150
    # L165-174: equal weights without conflict, else the solver on the lists of per-tensor gradients plus "concat"
    k_a = [0.5, 0.5] if cos_a > 0 else release_min_norm([list(rec_a[x].values()) for x in ("both", "audio")])
    k_v = [0.5, 0.5] if cos_v > 0 else release_min_norm([list(rec_v[x].values()) for x in ("both", "visual")])
    gamma = 1.5  # L178
    (losses[0] + losses[1] + losses[2]).backward()  # L180-181
    for name, param in model.named_parameters():  # L184-207
        if param.grad is None:
            continue
        tokens = re.split("[_.]", name)
        if "head" in tokens:
            continue
        for mod, k, rec, uni in (("audio", k_a, rec_a, "audio"), ("visual", k_v, rec_v, "visual")):
            if mod in tokens:
                three_norm = torch.norm(param.grad.data.clone())
                new_grad = 2 * k[0] * rec["both"][name] + 2 * k[1] * rec[uni][name]
                diff = three_norm / torch.norm(new_grad)
                param.grad = diff * new_grad * gamma if diff > 1 else new_grad * gamma
    opt.step()  # L209
    return float(cos_a), float(cos_v)


@pytest.mark.parametrize("set_to_none", [True, False], ids=["zero_grad_none", "zero_grad_zeros"])
def test_mmpareto_release_parity(blk, set_to_none):
    """Same model (conv + BN encoders, release names), same 4 batches, float64, SGD momentum 0.9 wd 1e-4: the block's
    three-gradient step and the release's four-backward step give the same parameters and BN buffers (1e-12), under
    either zero_grad semantics (the release pins no PyTorch version; every parameter gets a gradient each step)."""
    base = TwoEncoderModel("conv", seed=2).double()
    mine, rel = copy.deepcopy(base), copy.deepcopy(base)
    o_mine, o_rel = sgd(mine), sgd(rel)
    cosines = []
    for batch in batches(4, seed=2):
        st_a, st_v = block_step(blk, mine, o_mine, batch)
        cos_a, cos_v = release_step(rel, o_rel, *batch, set_to_none)
        assert (st_a["cos"] > 0) == (cos_a > 0) and (st_v["cos"] > 0) == (cos_v > 0)
        cosines += [cos_a, cos_v]
        assert max_param_diff(mine, rel) <= 1e-12
    assert min(cosines) < 0 < max(cosines)  # both branches were exercised
    assert max_param_diff(base, mine) > 1e-3  # and the parameters did move


# ----------------------------------------------------------------------------------------------------------------
# lift: the block on foreign models (conv toy; MLP encoders of widths 6 and 10 with a plain nn.Linear concat head)
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,dims", [("conv", (6, 6)), ("mlp", (6, 10))])
def test_lift_matches_the_release_step_on_a_foreign_model(blk, kind, dims):
    base = TwoEncoderModel(kind, dims=dims, classes=3, seed=8).double()
    mine, rel = copy.deepcopy(base), copy.deepcopy(base)
    o_mine, o_rel = sgd(mine), sgd(rel)
    conflicts = 0
    for batch in batches(3, classes=3, seed=8):
        st_a, st_v = block_step(blk, mine, o_mine, batch)
        release_step(rel, o_rel, *batch, True)
        conflicts += st_a["conflict"] + st_v["conflict"]
        assert max_param_diff(mine, rel) <= 1e-12
    assert conflicts > 0


@pytest.mark.parametrize("kind,dims", [("conv", (6, 6)), ("mlp", (6, 10))])
def test_lift_conflict_step_descends_on_both_losses(blk, kind, dims):
    """On a conflicting step, each encoder's update direction has a non-negative inner product with both its fused
    and its unimodal gradient (whole encoder, interior min-norm point), and is never shorter than gamma x the sum."""
    model = aligned(TwoEncoderModel(kind, dims=dims, seed=9).double(), sign=-1.0, scale=0.5)
    _, grads, st_a, st_v, (g_m, g_a, g_v) = block_grads(blk, model, *batches(1, seed=9)[0])
    na = len(list(model.audio_net.parameters()))
    for st, gm, gu, new in (
        (st_a, g_m[:na], g_a[:na], grads[:na]),
        (st_v, g_m[na : na + len(g_v) - 2], g_v[:-2], grads[na : na + len(g_v) - 2]),
    ):
        assert st["conflict"] == 1.0
        alpha = st["alpha_m"]
        d = [alpha * a + (1 - alpha) * b for a, b in zip(gm, gu)]
        dm = sum(float((x * a).sum()) for x, a in zip(d, gm))
        du = sum(float((x * b).sum()) for x, b in zip(d, gu))
        assert dm == pytest.approx(du, rel=1e-9) and dm >= 0
        for out, a, b in zip(new, gm, gu):
            assert float(out.norm()) >= 1.5 * float((a + b).norm()) * (1 - 1e-12)


# ----------------------------------------------------------------------------------------------------------------
# DDP: the combination must see the global batch's gradients (two gloo processes on CPU)
# ----------------------------------------------------------------------------------------------------------------
def _ddp_worker(rank, world, init_file, out_file):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    b = load_block("mmpareto.py")

    def all_reduce_sum(x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    model = TwoEncoderModel("mlp", dims=(6, 10), seed=10).double()  # no BN: the shards' forward equals the batch's
    x_a, x_v, y = batches(1, batch=16, seed=10)[0]
    shard = slice(rank * 8, rank * 8 + 8)
    _, grads, _, _, _ = block_grads(b, model, x_a[shard], x_v[shard], y[shard], reduce=all_reduce_sum)
    if rank == 0:
        torch.save([g.clone() for g in grads], out_file)
    dist.barrier()
    dist.destroy_process_group()


def test_ddp_two_processes_apply_the_global_batch_update(blk, tmp_path):
    import torch.multiprocessing as mp

    out = tmp_path / "grads.pt"
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    got = torch.load(out)
    model = TwoEncoderModel("mlp", dims=(6, 10), seed=10).double()
    batch = batches(1, batch=16, seed=10)[0]
    _, full, st_a, st_v, _ = block_grads(blk, model, *batch)
    for g, r in zip(got, full):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-15)
    # the alternative, each process combining its own shard's gradients and the results averaged (what editing
    # after a DDP backward of each loss would amount to), is a different update
    local = [block_grads(blk, model, *(x[s] for x in batch))[1] for s in (slice(0, 8), slice(8, 16))]
    avg = [(a + b) / 2 for a, b in zip(*local)]
    assert max(float((a - r).abs().max()) for a, r in zip(avg, full)) > 1e-6


# ----------------------------------------------------------------------------------------------------------------
# BalanceBenchmark's MMPareto trainer (GeWu-Lab/BalanceBenchmark 4c1482f, balancemm/trainer/MMPareto_trainer.py)
# ----------------------------------------------------------------------------------------------------------------
def test_balancebenchmark_trainer_reads_the_summed_gradients():
    """Its order, transcribed: every loss back-propagated without zeroing (L347-351), the gradients read afterwards
    for both records (L352-365): the fused and the unimodal record are the same sum, the cosine is 1 (L371), the
    weights stay 1/2 (L377-379), and with alpha 1.5 (configs/trainer_config.yaml L77-78) every encoder gradient
    becomes 2 x 1.5 = 3 x (g_m + g_u) (L384-399): the uniform baseline's encoder gradient times 3, not MMPareto."""
    model = aligned(TwoEncoderModel("mlp", seed=11).double(), sign=-1.0, scale=0.5)  # a step MMPareto sees as conflict
    x_a, x_v, y = batches(1, seed=11)[0]
    enc_a = list(model.audio_net.parameters())
    _, _, z, z_a, z_v = model(x_a, x_v)
    losses = [F.cross_entropy(z, y), F.cross_entropy(z_a, y), F.cross_entropy(z_v, y)]
    g_m = torch.autograd.grad(losses[0], enc_a, retain_graph=True)
    g_u = torch.autograd.grad(losses[1], enc_a, retain_graph=True)
    assert sum(float((a * b).sum()) for a, b in zip(g_m, g_u)) < 0  # the true gradients conflict
    for loss in losses:
        loss.backward(retain_graph=True)  # L351
    rec_output = [p.grad.clone() for p in enc_a]  # L360-365
    rec_audio = [p.grad.clone() for p in enc_a]  # L354-359
    cos = F.cosine_similarity(
        torch.cat([g.flatten() for g in rec_output]), torch.cat([g.flatten() for g in rec_audio]), dim=0
    )
    assert float(cos) == pytest.approx(1.0)
    model.zero_grad()  # L367
    sum(losses).backward()  # L383-384
    for p, go, gu in zip(enc_a, rec_output, rec_audio):
        new = 2 * 0.5 * go + 2 * 0.5 * gu  # L393
        diff = torch.norm(p.grad) / torch.norm(new)  # L390-395
        final = diff * new * 1.5 if diff > 1 else new * 1.5  # L396-399
        torch.testing.assert_close(final, 3 * (go), rtol=1e-12, atol=0)
    for p, a, b in zip(enc_a, g_m, g_u):
        torch.testing.assert_close(p.grad, a + b, rtol=1e-10, atol=1e-14)  # what was recorded: the plain sum


# ----------------------------------------------------------------------------------------------------------------
# the script: presets, flags, initialisation, the loop (one forward, logging), evaluation, resume
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dataset", ["cremad", "ks", "vggsound"])
def test_presets_are_the_releases_constant_lr(dataset):
    """§8.11: SGD 2e-3 (momentum 0.9, wd 1e-4), batch 64, 50 epochs, gamma 1.5, no clipping (MMPareto.py L28-35,
    L178, L296); its StepLR is built and never stepped (L301, no .step()), so the LR stays 2e-3 for all 50 epochs."""
    args = mmpareto.parse_args(["--dataset", dataset])
    assert (args.optimizer, args.lr, args.batch_size, args.epochs) == ("sgd", 2e-3, 64, 50)
    assert (args.gamma, args.weight_decay, args.clip_grad, args.lr_milestones) == (1.5, 1e-4, 0.0, [])
    assert (args.rescale, args.combine, args.init, args.fusion) == ("tensor", "mmpareto", "release", "concat")
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=args.lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, args.lr_milestones, args.lr_gamma)
    lrs = []
    for _ in range(args.epochs):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == [2e-3] * 50


def test_synthetic_preset_is_the_baselines():
    """On the synthetic set MMPareto trains with joint training's schedule (baseline.py), so the two compare."""
    import baseline

    assert mmpareto.PRESETS["synthetic"] == baseline.PRESETS["synthetic"]
    args, base = mmpareto.parse_args(["--dataset", "synthetic"]), baseline.parse_args(["--dataset", "synthetic"])
    keys = ("optimizer", "lr", "lr_milestones", "batch_size", "epochs", "weight_decay", "clip_grad")
    assert [getattr(args, k) for k in keys] == [getattr(base, k) for k in keys]


@pytest.mark.parametrize("init", ["release", "shared"])
def test_initialisation(init):
    """--init release (the default): no re-initialiser (MMPareto.py L278): BN weights N(1, 0.02), bias 0
    (backbone.py L104-109); every Linear at PyTorch's default (nonzero biases). --init shared: docs/models.md's."""
    from common.models import AVClassifier

    torch.manual_seed(0)
    model = mmpareto.add_unimodal_heads(AVClassifier(6), 6, init)
    bn = torch.cat([m.weight.detach() for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)])
    bn_bias = torch.cat([m.bias.detach() for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)])
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 3 and model.head_audio.weight.shape == model.head_visual.weight.shape == (6, 512)
    assert float(bn_bias.abs().max()) == 0
    if init == "release":
        assert abs(float(bn.mean()) - 1) < 0.002 and 0.018 < float(bn.std()) < 0.022
        assert all(float(m.bias.detach().abs().min()) > 0 for m in linears)
        bound = 1 / 512**0.5  # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        assert float(model.head_audio.weight.abs().max()) <= bound and float(model.head_audio.weight.std()) > bound / 3
    else:
        assert torch.equal(bn, torch.ones_like(bn))
        assert all(float(m.bias.abs().max()) == 0 for m in linears)
        w = model.head_audio.weight
        assert float(w.std()) == pytest.approx((2 / (512 + 6)) ** 0.5, rel=0.1)  # Xavier normal


@pytest.fixture(scope="module")
def two_epoch_run(tiny_data, tmp_path_factory):
    return run_inproc("mmpareto.py", tiny_data, tmp_path_factory.mktemp("mmp2"), "--epochs", 2, "--max-steps", 3)


def test_script_one_forward_per_step(two_epoch_run):
    """§8.10: every BatchNorm layer's num_batches_tracked grows by exactly 1 per step (2 epochs x 3 steps; the
    evaluation runs in eval mode)."""
    tracked = {k: int(v) for k, v in ckpt(two_epoch_run)["model"].items() if k.endswith("num_batches_tracked")}
    assert len(tracked) == 2 * 20 and set(tracked.values()) == {6}


def test_smoke_logs_every_epoch(two_epoch_run):
    """§8.13: no NaN; each epoch logs alpha_m, the cosine, the conflict fraction and the rescale of both encoders,
    train/loss = L_m + L_a + L_v (the release's logged loss, MMPareto.py L180)."""
    rows = history(two_epoch_run)
    assert len(rows) == 2
    for m in rows:
        for side in ("audio", "visual"):
            assert 0 <= m[f"train/coeff_{side}"] <= 1 and -1 <= m[f"train/cos_{side}"] <= 1
            assert 0 <= m[f"train/conflict_frac_{side}"] <= 1 and m[f"train/rescale_{side}"] >= 1
        parts = m["train/loss_fused"] + m["train/loss_audio"] + m["train/loss_visual"]
        assert m["train/loss"] == pytest.approx(parts, rel=1e-5)
        assert all(v == v for v in m.values() if isinstance(v, float))
    r = json.load(open(os.path.join(two_epoch_run, "results.json")))
    assert r["args"]["gamma"] == 1.5 and r["args"]["lr_milestones"] == [8]


def test_resume_continues_exactly(two_epoch_run, tiny_data, tmp_path):
    """--stop-after-epochs 1, then --resume: the checkpoint of the uninterrupted run, bitwise (MMPareto keeps no
    state across steps: model with both unimodal heads, optimizer, scheduler)."""
    run = run_inproc("mmpareto.py", tiny_data, tmp_path, "--epochs", 2, "--max-steps", 3, "--stop-after-epochs", 1)
    assert len(history(run)) == 1
    run_inproc("mmpareto.py", tiny_data, tmp_path, "--resume", run)
    a, b = ckpt(two_epoch_run), ckpt(run)
    assert same_state(a["model"], b["model"]) and any(k.startswith("head_visual.") for k in a["model"])
    for i, state in a["optimizer"]["state"].items():
        assert all(torch.equal(v, b["optimizer"]["state"][i][k]) for k, v in state.items())
    drop = lambda h: {k: v for k, v in h.items() if not k.startswith("charts/")}  # noqa: E731
    assert [drop(h) for h in history(run)] == [drop(h) for h in history(two_epoch_run)]


def test_unimodal_accuracy_is_that_of_the_separate_heads(two_epoch_run, tiny_data, monkeypatch):
    """§8.12: the evaluation's unimodal logits (test/acc_audio, test/acc_visual) are h_a(a), h_v(v) of the separate
    heads (MMPareto.py L239-261), not slices of the fusion head; z is the fusion head's. Read from the logits the
    script hands to common.evaluate (--eval-only on the run's checkpoint) against the checkpoint's model."""
    from common import evaluate as ev
    from common.models import AVClassifier, unimodal_logits

    seen = {}

    def capture(logits_fn, loader, device, num_classes, max_steps=0):
        spec, frames, _ = next(iter(loader))
        seen["inputs"] = (spec.unsqueeze(1), frames)
        with torch.no_grad():
            seen["out"] = logits_fn(*seen["inputs"])
        return {"test/acc": 0.0}

    monkeypatch.setattr(ev, "evaluate", capture)
    last = os.path.join(two_epoch_run, "last.pt")
    run_inproc("mmpareto.py", tiny_data, os.path.dirname(two_epoch_run), "--eval-only", "--checkpoint", last)
    from common.data import build_datasets

    frontend = build_datasets(mmpareto.parse_args(["--data-root", tiny_data]))[0].frontend
    model = mmpareto.add_unimodal_heads(AVClassifier(6, "concat", frontend), 6, "release")
    model.load_state_dict(ckpt(two_epoch_run)["model"])
    model.eval()
    with torch.no_grad():
        a, v = model.audio_net(seen["inputs"][0]), model.visual_net(seen["inputs"][1])
        z, z_a, z_v = seen["out"]
        torch.testing.assert_close(z, model.head(a, v)[2])
        torch.testing.assert_close(z_a, model.head_audio(a))
        torch.testing.assert_close(z_v, model.head_visual(v))
        for bias in ("half", "full"):
            s_a, s_v = unimodal_logits(model.head, a, v, bias)
            assert (z_a - s_a).abs().max() > 1e-3 and (z_v - s_v).abs().max() > 1e-3


def test_every_fusion_head_and_ablation_runs(tiny_data, tmp_path):
    """The separate heads read the pooled features, so every fusion head works (spec §3); the ablations run."""
    for i, extra in enumerate(
        (["--fusion", "film"], ["--fusion", "gated"], ["--fusion", "sum", "--rescale", "global"], ["--combine", "mgda"])
    ):
        run = run_inproc(
            "mmpareto.py", tiny_data, tmp_path / str(i), "--epochs", 1, "--max-steps", 2, "--no-save", *extra
        )
        m = history(run)[-1]
        assert m["train/loss"] == m["train/loss"] and 0 <= m["test/acc"] <= 1, extra


def test_flags_that_the_ablations_do_not_use_are_refused():
    for argv in (["--combine", "uniform", "--gamma", "2"], ["--combine", "mgda", "--rescale", "global"]):
        with pytest.raises(SystemExit) as e:
            mmpareto.parse_args(argv)
        assert e.value.code == 2


def test_lift_on_the_mlp_toy_matches_the_release_step(blk):
    """tests/mlp_toy.py's user model (ReLU MLP encoders of widths 24 and 40, a plain nn.Linear head) with the two
    unimodal heads a user adds: the lifted block's step equals the release's, 3 steps in float64, conflicts included."""
    from mlp_toy import D_A, D_V, C, MLPModel, make_data

    class WithHeads(MLPModel):
        def __init__(self):
            super().__init__(seed=1)
            self.head_audio, self.head_video = torch.nn.Linear(D_A, C), torch.nn.Linear(D_V, C)

        def forward(self, x_a, x_v):
            a, v, z = super().forward(x_a, x_v)
            return a, v, z, self.head_audio(a), self.head_video(v)

    base = WithHeads().double()
    mine, rel = copy.deepcopy(base), copy.deepcopy(base)
    o_mine, o_rel = sgd(mine), sgd(rel)
    conflicts = 0
    for seed in range(3):
        x_a, x_v, y = make_data(32, seed)
        batch = (x_a.double(), x_v.double(), y)
        st_a, st_v = block_step(blk, mine, o_mine, batch)
        release_step(rel, o_rel, *batch, True)
        conflicts += st_a["conflict"] + st_v["conflict"]
        assert max_param_diff(mine, rel) <= 1e-12
    assert conflicts > 0 and max_param_diff(base, mine) > 1e-3
