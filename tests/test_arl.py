"""ARL (arl.py): the properties listed in docs/arl.md (Tests), on CPU with tiny tensors and tiny synthetic data."""

import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import COEFF_KEYS, METRIC_KEYS, history, read_results, run_inproc, run_script

import arl
from common.models import AVClassifier

B, C = 4, 6


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, 1, 32, 32, generator=g), torch.randn(B, 3, 1, 32, 32, generator=g), torch.tensor([0, 1, 2, 3])


@pytest.fixture(scope="module")
def model0():
    torch.manual_seed(0)
    model = AVClassifier(C)
    with torch.no_grad():  # a trained-looking, non-zero, class-dependent bias (the init bias is zero)
        model.head.fc_out.bias.copy_(torch.linspace(-1, 1, C))
    return model


def grads_of(module):
    return {n: (torch.zeros_like(p) if p.grad is None else p.grad.clone()) for n, p in module.named_parameters()}


def run_inprocess(runs_dir, data_root, *extra):
    return run_inproc("arl.py", data_root, runs_dir, *extra)


def final_weights(run_dir):
    return torch.load(os.path.join(run_dir, "last.pt"), map_location="cpu", weights_only=False)["model"]


# ---------------------------------------------------------------------------------------------------------------
# GradScale
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("w", [0.0, 0.3, 0.9])
def test_gradscale_forward_is_identity(w):
    x = torch.randn(5, 7)
    assert torch.equal(arl.GradScale.apply(x, w), x)


@pytest.mark.parametrize("w", [0.0, 0.3, 0.9])
def test_gradscale_backward_scales_by_one_plus_w(w):
    x = torch.randn(5, 7, requires_grad=True)
    w_t = torch.tensor(w, requires_grad=True)
    g = torch.randn(5, 7)
    arl.GradScale.apply(x, w_t).backward(g)
    torch.testing.assert_close(x.grad, (1 + w) * g, rtol=1e-6, atol=0)
    assert w_t.grad is None  # w is a constant
    # float64 Jacobian of the backward: exactly (1 + w) I. (A gradcheck can only pass for w = 0: gradcheck
    # compares with the numerical Jacobian of the forward, the identity, and GradScale departs from it on purpose.)
    xd = torch.randn(3, 4, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda t: arl.GradScale.apply(t, w), xd).reshape(12, 12)
    assert torch.equal(jac, (1 + w) * torch.eye(12, dtype=torch.float64))
    if w == 0.0:
        assert torch.autograd.gradcheck(lambda t: arl.GradScale.apply(t, w), (xd.requires_grad_(),))


def test_gradscale_placement_before_or_after_pooling(model0, batch):
    """GradScale on the layer-4 map before pooling == on the pooled vector (pooling is linear, the scale a scalar)."""
    audio, w = batch[0], 0.7
    proj = torch.randn(512, 3)
    out = []
    for before in (True, False):
        net = copy.deepcopy(model0.audio_net)
        m = net.trunk(audio)
        if before:
            a = torch.flatten(F.adaptive_avg_pool2d(arl.GradScale.apply(m, w), 1), 1)
        else:
            a = arl.GradScale.apply(torch.flatten(F.adaptive_avg_pool2d(m, 1), 1), w)
        (a @ proj).square().sum().backward()
        out.append(grads_of(net))
    for n in out[0]:
        torch.testing.assert_close(out[0][n], out[1][n], atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# coefficients
# ---------------------------------------------------------------------------------------------------------------
def entropy(row):
    e = [math.exp(x) for x in row]
    p = [x / sum(e) for x in e]
    return -sum(q * math.log(q + 1e-16) for q in p)


def test_coefficients_match_hand_computation():
    z_a, z_v = [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]], [[1.0, -1.0, 0.0], [0.0, 0.0, 3.0]]
    T = 8.0
    D_a = (2 + 0) / 2 + (0 + 1) / 2 + 0  # sum over classes of the batch-mean |z|
    D_v = (1 + 0) / 2 + (1 + 0) / 2 + (0 + 3) / 2
    d_a = D_a / (D_a + D_v)
    H_a, H_v = sum(map(entropy, z_a)) / 2, sum(map(entropy, z_v)) / 2
    h_a, h_v = max(H_a / (H_a + H_v), 0.3), max(H_v / (H_a + H_v), 0.3)
    w_a = (1 / h_a) / (1 / h_a + 1 / h_v)
    e1, e2 = math.exp(T * (1 - d_a) * w_a), math.exp(T * d_a * (1 - w_a))
    r = arl.arl_coefficients(torch.tensor(z_a), torch.tensor(z_v), T)
    assert r["d_a"].item() == pytest.approx(d_a, abs=1e-6)
    assert r["entropy_a"].item() == pytest.approx(H_a, abs=1e-6)
    assert r["entropy_v"].item() == pytest.approx(H_v, abs=1e-6)
    assert r["w_a"].item() == pytest.approx(w_a, abs=1e-6)
    assert r["c_a"].item() == pytest.approx(e1 / (e1 + e2), abs=1e-6)
    assert r["c_v"].item() == pytest.approx(e2 / (e1 + e2), abs=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_coefficient_identities_and_ranges(seed):
    g = torch.Generator().manual_seed(seed)
    z_a = torch.randn(8, C, generator=g) * 10 ** (seed - 2)  # from near-uniform to saturated predictions
    z_v = torch.randn(8, C, generator=g) * 3
    T = 8.0
    r = arl.arl_coefficients(z_a, z_v, T)
    assert (r["c_a"] + r["c_v"]).item() == pytest.approx(1.0, abs=1e-6)
    assert r["c_a"].item() == pytest.approx(torch.sigmoid(T * (r["w_a"] - r["d_a"])).item(), abs=1e-6)
    assert 0.3 / 1.3 - 1e-6 <= r["w_a"].item() <= 1 / 1.3 + 1e-6  # the 0.3 floor bounds w_a to [0.231, 0.769]


def test_equal_logits_give_equal_coefficients():
    z = torch.randn(8, C)
    r = arl.arl_coefficients(z, z.clone(), 8.0)
    assert r["d_a"].item() == 0.5 and r["w_a"].item() == 0.5
    assert r["c_a"].item() == 0.5 and r["c_v"].item() == 0.5


def test_boosts_the_reliable_but_under_relied_upon_modality():
    """c_a > 0.5 exactly when audio's inverse-variance share exceeds its dependence share (not simply the weaker
    one)."""
    sharp_small = torch.tensor([[3.0, 0, 0, 0, 0, 0]]).repeat(4, 1)  # confident, small |logits|
    flat_large = torch.tensor([[5.0, 5, 5, 5, 5, 5.5]]).repeat(4, 1)  # near-uniform, large |logits|
    r = arl.arl_coefficients(sharp_small, flat_large, 8.0)
    assert r["w_a"] > 0.5 > r["d_a"] and r["c_a"] > 0.9  # audio is reliable and under-used: boost audio
    r = arl.arl_coefficients(flat_large, sharp_small, 8.0)
    assert r["w_a"] < 0.5 < r["d_a"] and r["c_a"] < 0.1  # the mirror case: boost visual
    dominant = 10 * F.one_hot(torch.arange(4), C).float()  # audio confident *and* relied upon far more
    r = arl.arl_coefficients(dominant, dominant / 10, 8.0)
    assert r["w_a"] > 0.5 and r["d_a"] > r["w_a"] and r["c_a"] < 0.5  # even the more reliable one can be damped


def test_monotone_in_audio_entropy_and_dependence():
    z_v = torch.randn(4, C, generator=torch.Generator().manual_seed(1))
    prev_ent, prev_w, prev_c = None, None, None
    for k in (5, 4, 3, 2, 1):  # the same L1 mass 6 per row spread over fewer classes: sharper, same D_a
        z_a = torch.zeros(4, C)
        z_a[:, :k] = 6.0 / k
        r = arl.arl_coefficients(z_a, z_v, 8.0)
        if prev_ent is not None:
            assert r["entropy_a"] < prev_ent  # precondition: the audio entropy does fall
            assert r["w_a"] >= prev_w and r["c_a"] >= prev_c  # non-strict once the floor binds
        prev_ent, prev_w, prev_c = r["entropy_a"], r["w_a"], r["c_a"]
    assert prev_c > arl.arl_coefficients(torch.full((4, C), 1.0), z_v, 8.0)["c_a"]  # strictly overall
    base = torch.rand(4, C, generator=torch.Generator().manual_seed(2)) + 0.1  # positive, so a shift grows |z_a|
    cs = [arl.arl_coefficients(base + s, z_v, 8.0) for s in (0.0, 1.0, 2.0)]
    for lo, hi in zip(cs, cs[1:]):
        assert hi["entropy_a"].item() == pytest.approx(lo["entropy_a"].item(), abs=1e-5)  # softmax is shift-invariant
        assert hi["d_a"] > lo["d_a"] and hi["c_a"] < lo["c_a"]


def test_temperature_zero_gives_equal_coefficients():
    r = arl.arl_coefficients(torch.randn(4, C) * 5, torch.randn(4, C), 0.0)
    assert r["c_a"].item() == 0.5 and r["c_v"].item() == 0.5


def test_guards_on_degenerate_logits():
    for z_a, z_v in (
        (torch.zeros(4, C), torch.zeros(4, C)),
        (1e4 * F.one_hot(torch.arange(4), C).float(), 1e4 * F.one_hot(torch.arange(4), C).float()),
    ):
        r = arl.arl_coefficients(z_a, z_v, 8.0)
        assert all(torch.isfinite(t).all() for t in r.values())
        assert r["c_a"].item() == pytest.approx(0.5)


def test_reduce_gives_the_global_batch_statistics():
    """Two processes, each with half the batch, summing with `reduce`, get the coefficients of the whole batch."""
    g = torch.Generator().manual_seed(3)
    z_a, z_v = torch.randn(8, C, generator=g) * 2, torch.randn(8, C, generator=g)
    full = arl.arl_coefficients(z_a, z_v, 8.0)
    captured = {}

    def capture(t):
        captured["sums"] = t.clone()
        return t

    arl.arl_coefficients(z_a[4:], z_v[4:], 8.0, reduce=capture)  # the other process's sums
    split = arl.arl_coefficients(z_a[:4], z_v[:4], 8.0, reduce=lambda t: t + captured["sums"])
    for k, v in full.items():
        assert split[k].item() == pytest.approx(v.item(), abs=1e-6), k
    half = arl.arl_coefficients(z_a[:4], z_v[:4], 8.0)  # control: one half alone differs
    assert half["d_a"].item() != pytest.approx(full["d_a"].item(), abs=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# the training step's gradients
# ---------------------------------------------------------------------------------------------------------------
def step_grads(model0, batch, coeff, weight, dtype=torch.float32):
    model = copy.deepcopy(model0).to(dtype)
    audio, visual, y = batch
    audio, visual = audio.to(dtype), visual.to(dtype)
    _, _, z, z_a, z_v = arl.forward(model, audio, visual, coeff)
    loss = arl.arl_loss(z, z_a, z_v, y, weight)[0]
    loss.backward()
    return model, {k: grads_of(getattr(model, k)) for k in ("audio_net", "visual_net", "head")}


def test_warmup_loss_is_unweighted_sum(model0, batch):
    """The warm-up step (no GradScale, weight 1) gives every parameter the gradient of CE(z) + CE(z_a) + CE(z_v),
    with z_a, z_v written out by hand here: a W_a^T + b and v W_v^T + b (zero-fill, full bias)."""
    audio, visual, y = batch
    model, got = step_grads(model0, batch, (0.0, 0.0), 1.0)
    ref = copy.deepcopy(model0)
    a, v = ref.audio_net(audio), ref.visual_net(visual)
    W, b = ref.head.fc_out.weight, ref.head.fc_out.bias
    z = torch.cat([a, v], 1) @ W.T + b
    z_a, z_v = a @ W[:, :512].T + b, v @ W[:, 512:].T + b
    (F.cross_entropy(z, y) + F.cross_entropy(z_a, y) + F.cross_entropy(z_v, y)).backward()
    for part in ("audio_net", "visual_net", "head"):
        for n, g in grads_of(getattr(ref, part)).items():
            torch.testing.assert_close(got[part][n], g, rtol=1e-4, atol=1e-7, msg=f"{part}.{n}")
    _, gamma_grads = step_grads(model0, batch, (0.0, 0.0), 4.0)  # control: the weight changes the gradients
    assert not all(torch.allclose(g, got["audio_net"][n]) for n, g in gamma_grads["audio_net"].items())


def test_loss_after_warmup_weights_the_unimodal_losses_by_gamma(model0, batch):
    audio, visual, y = batch
    _, _, z, z_a, z_v = arl.forward(copy.deepcopy(model0), audio, visual, (0.3, 0.7))
    loss, loss_f, loss_a, loss_v = arl.arl_loss(z, z_a, z_v, y, 4.0)
    assert (loss_f.item(), loss_a.item(), loss_v.item()) == pytest.approx(
        tuple(F.cross_entropy(t, y).item() for t in (z, z_a, z_v))
    )
    assert loss.item() == pytest.approx((loss_f + 4.0 * (loss_a + loss_v)).item())
    assert loss_a.item() + loss_v.item() > 0.1  # so the weight matters


def test_encoder_gradients_scaled_by_one_plus_c_head_unscaled(model0, batch):
    """After warm-up each encoder's gradient is (1 + c_m) times that of L_f + gamma (L_a + L_v); the head is
    unscaled."""
    # float64: in fp32 the scaled and unscaled backward passes round differently inside the convolutions
    _, ref = step_grads(model0, batch, (0.0, 0.0), 4.0, torch.float64)
    c_a, c_v = 0.8, 0.2
    _, got = step_grads(model0, batch, (c_a, c_v), 4.0, torch.float64)
    for role, s in (("audio_net", 1 + c_a), ("visual_net", 1 + c_v)):
        for n, g in ref[role].items():
            torch.testing.assert_close(got[role][n], s * g, rtol=1e-6, atol=1e-12)
        assert any(g.abs().sum() > 0 for g in ref[role].values())
    for n, g in ref["head"].items():
        torch.testing.assert_close(got["head"][n], g, rtol=1e-6, atol=1e-12)


def test_coefficient_set_after_the_forward_pass_scales_like_a_number(model0, batch):
    """--arl-coeff-timing current: GradScale reads a Coefficient in the backward pass, so a value set after the
    forward pass (the same batch's coefficients) acts exactly as that number given to the forward pass would."""
    c_a, c_v = 0.8, 0.2
    _, want = step_grads(model0, batch, (c_a, c_v), 4.0, torch.float64)
    _, ref = step_grads(model0, batch, (0.0, 0.0), 4.0, torch.float64)
    model = copy.deepcopy(model0).to(torch.float64)
    audio, visual, y = batch
    scale = (arl.Coefficient(), arl.Coefficient())
    _, _, z, z_a, z_v = arl.forward(model, audio.double(), visual.double(), scale)
    scale[0].value, scale[1].value = c_a, c_v
    arl.arl_loss(z, z_a, z_v, y, 4.0)[0].backward()
    for role in ("audio_net", "visual_net", "head"):
        got = grads_of(getattr(model, role))
        for n, g in want[role].items():
            torch.testing.assert_close(got[n], g, rtol=1e-6, atol=1e-12)
    for n, g in ref["audio_net"].items():  # control: the late value did scale
        if g.abs().sum() > 0:
            torch.testing.assert_close(grads_of(model.audio_net)[n], (1 + c_a) * g, rtol=1e-6, atol=1e-12)


def test_zero_fill_logits_and_audio_loss_reaches_only_audio_columns(model0, batch):
    audio, visual, y = batch
    model = copy.deepcopy(model0)
    a, v, z, z_a, z_v = arl.forward(model, audio, visual, (0.5, 0.5))
    W, b = model.head.fc_out.weight, model.head.fc_out.bias
    torch.testing.assert_close(z_a, a @ W[:, :512].T + b, atol=1e-5, rtol=0)
    torch.testing.assert_close(z_a + z_v - b, z, atol=1e-5, rtol=0)
    F.cross_entropy(z_a, y).backward()
    assert torch.count_nonzero(W.grad[:, 512:]) == 0
    assert W.grad[:, :512].abs().sum() > 0 and b.grad.abs().sum() > 0


def test_arl_presets_follow_the_paper_where_the_release_cannot_run():
    """The release does not run as shipped (docs/arl.md), so gamma is the paper's 4 on every dataset (its KS launch
    script has 3); T is the launch scripts' and the paper's (CREMA-D 8, KS 4); VGGSound's is ours (4, as KS); the
    warm-up is epochs 0-5 (synthetic: epoch 0)."""
    want = {"cremad": (4.0, 8.0, 6), "ks": (4.0, 4.0, 6), "vggsound": (4.0, 4.0, 6), "synthetic": (4.0, 8.0, 1)}
    assert {d: (r["gamma"], r["temperature"], r["warmup_epochs"]) for d, r in arl.ARL_PRESETS.items()} == want


def test_clipping_at_40_by_default(model0, batch):
    for dataset in arl.PRESETS:
        args = arl.parse_args(["--dataset", dataset])
        assert args.clip_grad == 40.0
    model, _ = step_grads(model0, batch, (0.9, 0.1), 4.0)
    total = torch.nn.utils.clip_grad_norm_(model.parameters(), 40.0)
    assert total > 40  # precondition: this gradient is clipped
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert norm <= 40 + 1e-4


# ---------------------------------------------------------------------------------------------------------------
# end to end: smoke, timing and warm-up in the logs, T = 0 vs fixed, resume
# ---------------------------------------------------------------------------------------------------------------
SHARED_KEYS = METRIC_KEYS + COEFF_KEYS  # the metric vocabulary (tests/conftest.py)
EXTRA_KEYS = [
    "train/loss_fused",
    "train/dep_audio",
    "train/var_share_audio",
    "train/target_ratio",
    "train/entropy_audio",
    "train/entropy_visual",
]


def test_smoke(tiny_data, tmp_path):
    proc, run = run_script("arl.py", tiny_data, tmp_path, *"--epochs 2 --max-steps 2 --warmup-epochs 1".split())
    r = read_results(run)
    for key in SHARED_KEYS + EXTRA_KEYS:
        assert key in r["last"], key
    assert 0 <= r["best"]["test/acc"] <= 1
    assert r["args"]["clip_grad"] == 40.0 and r["args"]["gamma"] == 4.0 and r["args"]["temperature"] == 8.0


@pytest.fixture(scope="module")
def three_epoch_run(tiny_data, tmp_path_factory):
    """3 epochs of 1 step each, warm-up = epoch 0: every logged value is one step's value."""
    return run_inprocess(
        tmp_path_factory.mktemp("arl3"), tiny_data, *"--epochs 3 --max-steps 1 --warmup-epochs 1".split()
    )


def test_warmup_and_previous_step_timing_in_the_logs(three_epoch_run):
    m = history(three_epoch_run)
    T, gamma = 8.0, 4.0
    assert m[0]["train/coeff_audio"] == 1.0 and m[0]["train/coeff_visual"] == 1.0  # warm-up: no scaling
    assert m[0]["train/loss"] == pytest.approx(
        m[0]["train/loss_fused"] + m[0]["train/loss_audio"] + m[0]["train/loss_visual"], rel=1e-5
    )
    assert m[1]["train/coeff_audio"] == 1.5 and m[1]["train/coeff_visual"] == 1.5  # first post-warm-up step: (0.5, 0.5)
    for e in (1, 2):
        assert m[e]["train/loss"] == pytest.approx(
            m[e]["train/loss_fused"] + gamma * (m[e]["train/loss_audio"] + m[e]["train/loss_visual"]), rel=1e-5
        )
    c_a_epoch1 = 1 / (1 + math.exp(-T * (m[1]["train/var_share_audio"] - m[1]["train/dep_audio"])))
    assert m[2]["train/coeff_audio"] == pytest.approx(1 + c_a_epoch1, abs=1e-5)  # step t uses step t-1, across epochs
    assert m[2]["train/coeff_audio"] + m[2]["train/coeff_visual"] == pytest.approx(3.0, abs=1e-6)
    assert m[2]["train/coeff_audio"] != 1.5


def test_current_timing_uses_the_same_batch(tiny_data, tmp_path):
    m = history(
        run_inprocess(
            tmp_path,
            tiny_data,
            *"--epochs 2 --max-steps 1 --warmup-epochs 1 --arl-coeff-timing current".split(),
        )
    )
    c_a = 1 / (1 + math.exp(-8.0 * (m[1]["train/var_share_audio"] - m[1]["train/dep_audio"])))
    assert m[1]["train/coeff_audio"] == pytest.approx(1 + c_a, abs=1e-5) and m[1]["train/coeff_audio"] != 1.5


def test_temperature_zero_run_is_the_fixed_weights_run(tiny_data, tmp_path):
    common = ["--epochs", "1", "--max-steps", "3", "--warmup-epochs", "0"]
    runs = {
        name: final_weights(run_inprocess(tmp_path / name, tiny_data, *common, *flags))
        for name, flags in (("t0", ["--T", "0"]), ("fixed", ["--arl-weights", "fixed"]), ("computed", []))
    }
    assert all(torch.equal(runs["t0"][k], runs["fixed"][k]) for k in runs["t0"])
    assert not all(torch.equal(runs["computed"][k], runs["fixed"][k]) for k in runs["t0"])  # control: the flag matters


def test_resume_continues_exactly(three_epoch_run, tiny_data, tmp_path):
    """Interrupt after 2 epochs, resume: the coefficient state carries over and the result equals an uninterrupted
    run."""
    args = ["--epochs", "3", "--max-steps", "1", "--warmup-epochs", "1"]
    run = run_inprocess(tmp_path, tiny_data, *args, "--stop-after-epochs", "2")
    assert len(history(run)) == 2
    ckpt = torch.load(os.path.join(run, "last.pt"), map_location="cpu", weights_only=False)
    assert ckpt["arl_coeff"] != (0.5, 0.5)
    run_inprocess(tmp_path, tiny_data, "--resume", run)
    full, resumed = history(three_epoch_run), history(run)
    assert [m["train/coeff_audio"] for m in resumed] == [m["train/coeff_audio"] for m in full]
    assert [m["test/acc"] for m in resumed] == [m["test/acc"] for m in full]
    a, b = final_weights(three_epoch_run), final_weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------------------------
# the training loop's gradients, seen in the parameters after one SGD step (lr 1, no weight decay: the first step
# moves every parameter by minus its gradient; momentum has no history yet)
# ---------------------------------------------------------------------------------------------------------------
def one_step_delta(tiny_data, runs_dir, *flags):
    """{parameter name: change after one step of `arl.py --lr 1 --weight-decay 0 <flags>`}, and the run folder."""
    torch.manual_seed(0)  # the script's initialisation: seed, then the model is the first draw
    init = {n: p.detach().clone() for n, p in AVClassifier(C).named_parameters()}
    run = run_inprocess(runs_dir, tiny_data, *"--epochs 1 --max-steps 1 --lr 1 --weight-decay 0".split(), *flags)
    m = final_weights(run)
    return {n: m[n] - p for n, p in init.items()}, run


def norm_of(delta, prefix=""):
    return torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(d) for n, d in delta.items() if n.startswith(prefix)])
    ).item()


def test_clipping_in_the_training_loop(tiny_data, tmp_path):
    """--clip-grad 0.05: the step's gradient has global norm 0.05 (it is far larger unclipped)."""
    clipped, _ = one_step_delta(tiny_data, tmp_path / "c", "--clip-grad", "0.05", "--warmup-epochs", "0")
    free, _ = one_step_delta(tiny_data, tmp_path / "f", "--clip-grad", "0", "--warmup-epochs", "0")
    assert norm_of(clipped) == pytest.approx(0.05, rel=1e-3)
    assert norm_of(free) > 0.5


def test_current_timing_scales_the_gradients_of_the_same_batch(tiny_data, tmp_path):
    """--arl-coeff-timing current (no --amp): the encoders' step is (1 + c) times their unscaled gradient, c from this
    batch (logged as train/coeff_*), i.e. (1 + c) / 1.5 times the first step of the default timing, which uses the
    initial (0.5, 0.5); the head's step is the same in both."""
    flags = ("--clip-grad", "0", "--warmup-epochs", "0")
    cur, run = one_step_delta(tiny_data, tmp_path / "cur", *flags, "--arl-coeff-timing", "current")
    prev, _ = one_step_delta(tiny_data, tmp_path / "prev", *flags)
    m = history(run)[0]
    assert abs(m["train/coeff_audio"] - 1.5) > 0.01  # precondition: c_a differs from the initial 0.5
    for prefix, key in (("audio_net.", "train/coeff_audio"), ("visual_net.", "train/coeff_visual")):
        r = m[key] / 1.5
        for n in cur:
            if n.startswith(prefix):
                err = torch.linalg.vector_norm(cur[n] - r * prev[n]).item()
                assert err <= 1e-3 * torch.linalg.vector_norm(cur[n]).item() + 1e-9, n
    for n in cur:
        if n.startswith("head."):
            torch.testing.assert_close(cur[n], prev[n], rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------------
# edges of the coefficients, the logged ratios and the evaluation's unimodal logits
# ---------------------------------------------------------------------------------------------------------------
def test_an_unset_coefficient_leaves_the_gradient_unscaled():
    c = arl.Coefficient()
    assert float(c) == 0.0
    x = torch.randn(3, 5, requires_grad=True)
    arl.GradScale.apply(x, c).sum().backward()
    assert torch.equal(x.grad, torch.ones(3, 5))


def with_sums(dep=None, ent=None):
    """A `reduce` that replaces the batch's sums: per-class |logit| sums of audio (dep[0] in the first class) and
    visual (dep[1]), the entropy sums (ent), one sample; so a test can put a statistic exactly on a guard's edge."""

    def reduce(t):
        t = t.clone()
        if dep is not None:
            t[: 2 * C] = 0
            t[0], t[C] = dep
        if ent is not None:
            t[2 * C], t[2 * C + 1] = ent
        t[-1] = 1
        return t

    return reduce


def test_the_guards_apply_strictly_below_1e_12():
    """d_a falls back to 0.5 only when the dependence sum is below 1e-12 (at 1e-12 and at 1.5e-12 it is the share),
    and the entropy shares fall back to equal weights only when the entropy sum is below 1e-12."""
    z = torch.randn(4, C)
    edge = torch.tensor(1e-12, dtype=torch.float32).item()  # the float32 value the comparison uses
    for s in (edge, 1.5e-12):
        r = arl.arl_coefficients(z, z, 8.0, reduce=with_sums(dep=(s, 0.0)))
        assert r["d_a"].item() == 1.0, s
    assert arl.arl_coefficients(z, z, 8.0, reduce=with_sums(dep=(0.5e-12, 0.0)))["d_a"].item() == 0.5
    for s in (edge, 1.5e-12):  # entropy shares (1, 0) -> floored (1, 0.3) -> w_a = 1 / (1 + 1 / 0.3)
        r = arl.arl_coefficients(z, z, 8.0, reduce=with_sums(dep=(1.0, 1.0), ent=(s, 0.0)))
        assert r["w_a"].item() == pytest.approx(1 / (1 + 1 / 0.3), abs=1e-6), s
    r = arl.arl_coefficients(z, z, 8.0, reduce=with_sums(dep=(1.0, 1.0), ent=(0.5e-12, 0.0)))
    assert r["w_a"].item() == 0.5


def test_entropy_is_minus_p_log_p_plus_1e_16():
    """The entropy uses log(p + 1e-16): visible where a probability is ~1e-20 (a confident prediction)."""
    z_conf = torch.tensor([[0.0, -46.0] + [-60.0] * (C - 2)])
    z_flat = torch.zeros(1, C)
    for z_a, z_v, key in ((z_conf, z_flat, "entropy_a"), (z_flat, z_conf, "entropy_v")):
        p = torch.softmax(z_conf, 1).double()
        want = -(p * torch.log(p + 1e-16)).sum().item()
        got = arl.arl_coefficients(z_a, z_v, 8.0)[key].item()
        assert got == pytest.approx(want, rel=1e-3, abs=0) and want < 1e-17, key


def test_logged_ratios_are_the_shares_ratios(tiny_data, tmp_path):
    """One step, so the epoch's means are the step's values: train/ratio = d_a / d_v, train/target_ratio =
    w_a / w_v."""
    _, run = one_step_delta(tiny_data, tmp_path, "--warmup-epochs", "0")
    m = history(run)[0]
    d_a, w_a = m["train/dep_audio"], m["train/var_share_audio"]
    assert m["train/ratio"] == pytest.approx(d_a / (1 - d_a), rel=1e-5)
    assert m["train/target_ratio"] == pytest.approx(w_a / (1 - w_a), rel=1e-5)


def test_evaluation_reads_zero_fill_full_bias_logits(tiny_data, tmp_path, monkeypatch):
    """The evaluation's z_a, z_v are the zero-fill logits with the full bias (common/models.py unimodal_logits) of
    the model being evaluated, on the evaluated batch."""
    import common.evaluate
    from common.models import unimodal_logits

    real, seen = common.evaluate.evaluate, []

    def spy(logits_fn, loader, *a, **k):
        spec, frames, _ = next(iter(loader))
        model = logits_fn.__globals__["model"]  # the script's model (run with runpy: a global of the run)
        with torch.no_grad():
            z, z_a, z_v = logits_fn(spec.unsqueeze(1), frames)
            f_a, f_v, _ = model(spec.unsqueeze(1), frames)
            seen.append((z_a, z_v, *unimodal_logits(model.head, f_a, f_v, bias="full")))
        return real(logits_fn, loader, *a, **k)

    monkeypatch.setattr(common.evaluate, "evaluate", spy)
    run_inprocess(tmp_path, tiny_data, *"--epochs 1 --max-steps 2 --eval-max-steps 1".split())
    assert seen
    for z_a, z_v, want_a, want_v in seen:  # the same operations in the same order: bitwise
        assert torch.equal(z_a, want_a) and torch.equal(z_v, want_v)
