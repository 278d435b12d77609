"""ogm.py: the properties listed in docs/ogm.md (Tests), on CPU and tiny synthetic data.

Unit tests import the script (`import ogm`); end-to-end tests run it in this process with `runpy` (the same code
path as `python ogm.py ...`, without paying the torch/torchvision import for every run), one `subprocess` smoke test.
"""

import copy
import glob
import json
import math
import random

import pytest
import torch
import torch.nn.functional as F
from conftest import COEFF_KEYS, METRIC_KEYS, ckpt, history, read_results, run_inproc, run_script, same_state

import ogm  # noqa: E402  (conftest puts the repo root on sys.path)
from common import distributed
from common.models import AVClassifier, unimodal_logits
from common.synthetic import generate
from tools import trace

SHARED_KEYS = METRIC_KEYS + COEFF_KEYS  # the metric vocabulary (tests/conftest.py)


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------
def no_timing(rows):
    return [{k: v for k, v in r.items() if k not in ("charts/samples_per_sec", "charts/epoch_time")} for r in rows]


def tiny_batch(b=4, seed=0):
    """Inputs of the synthetic pipeline's shapes: spectrogram (B, 1, 33, 33), one 32 px frame."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 1, 33, 33, generator=g), torch.randn(b, 3, 1, 32, 32, generator=g), torch.arange(b) % 6)


def model_with_grads(seed=0, b=4):
    """A model after one forward/backward of the fused loss, as in the training loop (before modulation)."""
    torch.manual_seed(seed)
    model = AVClassifier(6, "concat")
    with torch.no_grad():
        model.head.fc_out.bias.normal_()  # non-zero bias: the half-bias convention matters
    audio, visual, label = tiny_batch(b, seed)
    f_a, f_v, z = model.head(model.audio_net(audio), model.visual_net(visual))
    F.cross_entropy(z, label).backward()
    with torch.no_grad():
        s_a, s_v = ogm.ogm_scores(*unimodal_logits(model.head, f_a, f_v, bias="half"), label)
    return model, s_a.item(), s_v.item()


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def baseline_2ep(tiny_data, tmp_path_factory):
    return run_inproc("baseline.py", tiny_data, tmp_path_factory.mktemp("base"), *"--epochs 2 --max-steps 2".split())


# ----------------------------------------------------------------------------------------------------------------
# the maths: coefficients, half-bias logits, scores
# ----------------------------------------------------------------------------------------------------------------
# docs/ogm.md (The method): k = 1 - tanh(alpha rho) for rho = 1, 1.2, 1.5, 2, 3
K_TABLE = {
    0.1: [0.900, 0.881, 0.851, 0.803, 0.709],
    0.3: [0.709, 0.655, 0.578, 0.463, 0.284],
    0.8: [0.336, 0.256, 0.166, 0.078, 0.016],
    0.9: [0.284, 0.207, 0.126, 0.053, 0.009],
    2.6: [0.011, 0.004, 0.001, 0.000, 0.000],
}


@pytest.mark.parametrize("alpha", sorted(K_TABLE))
def test_coefficients_table(alpha):
    for rho, k in zip([1.2, 1.5, 2, 3], K_TABLE[alpha][1:]):
        k_a, k_v, audio_dominant = ogm.ogm_coefficients(3.0 * rho, 3.0, alpha)  # audio dominant
        assert round(k_a, 3) == k and k_v == 1.0 and audio_dominant is True
        k_a, k_v, audio_dominant = ogm.ogm_coefficients(3.0, 3.0 * rho, alpha)  # visual dominant
        assert round(k_v, 3) == k and k_a == 1.0 and audio_dominant is False
    k_a, k_v, audio_dominant = ogm.ogm_coefficients(2.5, 2.5, alpha)  # a tie: audio is modulated (CVPR release)
    assert k_a == pytest.approx(1 - math.tanh(alpha)) and round(k_a, 3) == K_TABLE[alpha][0] and k_v == 1.0
    assert audio_dominant is True
    assert ogm.ogm_coefficients(2.5, 2.5, alpha, tie="audio") == (k_a, k_v, True)
    # tie="visual" (the T-PAMI release): visual is modulated on a tie, and only there
    assert ogm.ogm_coefficients(2.5, 2.5, alpha, tie="visual") == (1.0, k_a, False)
    assert ogm.ogm_coefficients(2.5 * (1 + 1e-15), 2.5, alpha, tie="visual")[2] is True
    # the scores as the loop passes them: 0-d tensors of the summed scores
    k_a, k_v, audio_dominant = ogm.ogm_coefficients(torch.tensor(3.0 * 1.5), torch.tensor(3.0), alpha)
    assert round(k_a, 3) == K_TABLE[alpha][2] and k_v == 1.0 and audio_dominant is True


def test_exactly_one_side_modulated():
    rng = random.Random(0)
    for _ in range(2000):
        s_a, s_v, alpha = rng.uniform(0.01, 64), rng.uniform(0.01, 64), rng.uniform(0.05, 3)
        k_a, k_v, audio_dominant = ogm.ogm_coefficients(s_a, s_v, alpha)
        assert max(k_a, k_v) == 1.0
        assert audio_dominant == (s_a >= s_v)
        assert min(k_a, k_v) <= 1 - math.tanh(alpha) + 1e-12
        assert (k_a < 1) == (s_a > s_v) and (k_v < 1) == (s_v > s_a)


@pytest.mark.parametrize(
    "preset,flags,audio",
    [
        ("cvpr", [], True),
        ("tpami", [], False),
        ("tpami", ["--tie-modulates", "audio"], True),
        ("cvpr", ["--tie-modulates", "visual"], False),
    ],
)
def test_tie_side_in_the_loop(tiny_data, tmp_path, monkeypatch, preset, flags, audio):
    """An exact tie (the summed scores replaced by their mean): the side --tie-modulates names is modulated; left out,
    audio with --preset cvpr and visual with --preset tpami, as the releases (tests/test_parity_ogm.py)."""
    monkeypatch.setattr(
        distributed, "all_reduce_sum", lambda s: torch.stack([s.mean(), s.mean()]) if torch.is_tensor(s) else s
    )
    run = run_inproc(
        "ogm.py",
        tiny_data,
        tmp_path,
        *"--epochs 1 --max-steps 1 --preset".split(),
        preset,
        "--warmup-epochs",
        0,
        *flags,
    )
    row = history(run)[0]
    assert row["train/ratio"] == 1.0 and row["train/modulated_audio_frac"] == float(audio)
    assert (row["train/coeff_audio"] < 1, row["train/coeff_visual"] < 1) == (audio, not audio)


def test_ratio_offset_is_continuous_at_one():
    assert ogm.ogm_coefficients(2.0, 2.0, 0.8, ratio_offset=1.0)[:2] == (1.0, 1.0)
    k_a, _, _ = ogm.ogm_coefficients(2.0 * 1.5, 2.0, 0.8, ratio_offset=1.0)
    assert k_a == pytest.approx(1 - math.tanh(0.8 * 0.5))
    k = ogm.ogm_coefficients(2.0, 2.0 * 1.5, 0.8, ratio_offset=1.0)  # visual dominant
    assert k == (1.0, pytest.approx(1 - math.tanh(0.8 * 0.5)), False)


def test_half_bias_identity():
    torch.manual_seed(0)
    a, v = torch.randn(5, 512), torch.randn(5, 512)
    for fusion in ("concat", "sum"):
        model = AVClassifier(6, fusion)
        with torch.no_grad():
            for p in model.head.parameters():
                if p.dim() == 1:
                    p.normal_()
        f_a, f_v, z = model.head(a, v)
        z_a, z_v = unimodal_logits(model.head, f_a, f_v, bias="half")
        torch.testing.assert_close(z_a + z_v, z, atol=1e-5, rtol=0)


def test_scores_are_batch_sums_and_ratio_is_batch_size_free():
    torch.manual_seed(0)
    z_a, z_v, y = torch.randn(8, 6), torch.randn(8, 6), torch.randint(0, 6, (8,))
    s = ogm.ogm_scores(z_a, z_v, y)
    assert s.shape == (2,)
    s_a, s_v = s
    assert s_a.item() == pytest.approx(sum(torch.softmax(z_a[i], 0)[y[i]].item() for i in range(8)), rel=1e-6)
    s2_a, s2_v = ogm.ogm_scores(torch.cat([z_a, z_a]), torch.cat([z_v, z_v]), torch.cat([y, y]))
    assert s2_a.item() == pytest.approx(2 * s_a.item(), rel=1e-6)
    assert (s2_a / s2_v).item() == pytest.approx((s_a / s_v).item(), rel=1e-6)


def test_scores_do_not_train():
    """ogm_scores of logits that carry a graph return a tensor without one (the function itself runs without
    gradient tracking), and computing them leaves the gradients of CE(z, y) unchanged."""
    torch.manual_seed(0)
    model = AVClassifier(6, "concat")
    ref = copy.deepcopy(model)
    audio, visual, label = tiny_batch()
    f_a, f_v, z = model.head(model.audio_net(audio), model.visual_net(visual))
    z_a, z_v = unimodal_logits(model.head, f_a, f_v, bias="half")
    assert z_a.requires_grad and z_v.requires_grad  # precondition: the logits carry a graph
    s = ogm.ogm_scores(z_a, z_v, label)
    assert not s.requires_grad and s.grad_fn is None
    F.cross_entropy(z, label).backward()
    _, _, z_ref = ref.head(ref.audio_net(audio), ref.visual_net(visual))
    F.cross_entropy(z_ref, label).backward()
    got, want = grads(model), grads(ref)
    assert got.keys() == want.keys() and all(torch.equal(g, want[n]) for n, g in got.items())


# ----------------------------------------------------------------------------------------------------------------
# which gradients are scaled, and the GE noise
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("swap", [False, True])
def test_only_dominant_conv_kernels_scaled(swap):
    model, s_a, s_v = model_with_grads()
    k_a, k_v, _ = ogm.ogm_coefficients(s_v, s_a, 0.8) if swap else ogm.ogm_coefficients(s_a, s_v, 0.8)
    k_a, k_v = (k_v, k_a) if swap else (k_a, k_v)  # swap: the other encoder is the dominant one
    dominant, k = ("audio_net.", k_a) if k_a < 1 else ("visual_net.", k_v)
    assert k < 1 and max(k_a, k_v) == 1.0
    old = grads(model)
    ogm.modulate_gradients(model.audio_net, model.visual_net, k_a, k_v, False, False)
    new = grads(model)
    n_scaled = 0
    for n, g in old.items():
        if n.startswith(dominant) and g.dim() == 4:
            torch.testing.assert_close(new[n], k * g, rtol=1e-6, atol=0)
            assert torch.equal(new[n], g * k)
            n_scaled += 1
        else:  # the other encoder, every BatchNorm weight and bias, the head
            assert torch.equal(new[n], g), n
    assert n_scaled == 20  # ResNet18: stem + 16 block convs + 3 shortcut convs


def test_nonbias_selects_the_same_params_for_resnet18():
    model, s_a, s_v = model_with_grads()
    old = grads(model)
    ogm.modulate_gradients(model.audio_net, model.visual_net, 0.3, 0.7, False, False, params="conv")
    conv = grads(model)
    for n, p in model.named_parameters():
        if p.grad is not None:
            p.grad = old[n].clone()
    ogm.modulate_gradients(model.audio_net, model.visual_net, 0.3, 0.7, False, False, params="nonbias")
    nonbias = grads(model)
    assert all(torch.equal(g, nonbias[n]) for n, g in conv.items())
    assert not all(torch.equal(g, old[n]) for n, g in conv.items())


def test_ge_noise_statistics():
    model, s_a, s_v = model_with_grads()
    k_a, k_v, _ = ogm.ogm_coefficients(s_a, s_v, 0.8)
    old = grads(model)
    gen = torch.Generator().manual_seed(0)
    ogm.modulate_gradients(model.audio_net, model.visual_net, k_a, k_v, True, True, gen)
    first = grads(model)
    checked = {"audio_net": 0, "visual_net": 0}
    for n, g in old.items():
        if g.dim() != 4:
            assert torch.equal(first[n], g), n  # BN and head untouched
            continue
        k = k_a if n.startswith("audio_net") else k_v
        r = first[n] - k * g
        sigma = g.std().item() + 1e-8
        assert r.abs().max() > 0, n  # noise on both encoders, the weaker one included
        if g.numel() >= 10_000:
            assert abs(r.mean().item()) < 0.05 * sigma, n
            assert abs(r.std().item() / sigma - 1) < 0.05, n
            checked[n.split(".")[0]] += 1
    assert checked["audio_net"] >= 15 and checked["visual_net"] >= 15
    for n, p in model.named_parameters():  # a second step draws different noise
        if p.grad is not None:
            p.grad = old[n].clone()
    ogm.modulate_gradients(model.audio_net, model.visual_net, k_a, k_v, True, True, gen)
    second = grads(model)
    for n, g in old.items():
        if g.dim() == 4:
            assert not torch.equal(second[n], first[n]), n


def test_ge_noise_targets():
    for audio_dominant in (True, False):
        assert ogm.ge_noise(True, "both", audio_dominant) == (True, True)
        assert ogm.ge_noise(False, "both", audio_dominant) == (False, False)
        assert ogm.ge_noise(False, "dominant", audio_dominant) == (False, False)
        assert ogm.ge_noise(True, "dominant", audio_dominant) == (audio_dominant, not audio_dominant)


def test_modulation_window():
    assert [ogm.ogm_active(e, 0, 5) for e in range(8)] == [True] * 6 + [False] * 2  # inclusive end
    assert [ogm.ogm_active(e, 2, 5) for e in range(4)] == [False, False, True, True]
    assert [ogm.ogm_active(e, 0, 80, warmup_epochs=6) for e in (0, 5, 6, 80, 81)] == [False, False, True, True, False]


def test_ge_target_dominant_leaves_the_weak_encoder_alone():
    model, s_a, s_v = model_with_grads()
    k_a, k_v, audio_dominant = ogm.ogm_coefficients(s_a, s_v, 0.8)
    assert audio_dominant == (k_a < 1)
    old = grads(model)
    noise_a, noise_v = ogm.ge_noise(True, "dominant", audio_dominant)
    ogm.modulate_gradients(
        model.audio_net, model.visual_net, k_a, k_v, noise_a, noise_v, torch.Generator().manual_seed(0)
    )
    weak = "visual_net." if audio_dominant else "audio_net."
    new = grads(model)
    assert all(torch.equal(g, new[n]) for n, g in old.items() if n.startswith(weak))
    assert not all(torch.equal(g, new[n]) for n, g in old.items())


def other_conv():
    """A second encoder with a conv-kernel gradient (modulate_gradients refuses an encoder it selects nothing of); its
    noise is drawn after the first encoder's, so the first one's draws are those of a fresh generator."""
    conv = torch.nn.Conv2d(1, 1, 2, bias=False)
    conv.weight.grad = torch.arange(4.0).view_as(conv.weight)
    return conv


@pytest.mark.parametrize("source,expected", [("unscaled", 1.0), ("scaled", 0.1)])
def test_ge_std_source(source, expected):
    conv = torch.nn.Conv2d(64, 64, 3, bias=False)
    conv.weight.grad = torch.randn(conv.weight.shape, generator=torch.Generator().manual_seed(1)) * 2.0
    g_old = conv.weight.grad.clone()
    ogm.modulate_gradients(
        conv, other_conv(), 0.1, 1.0, True, True, torch.Generator().manual_seed(0), std_source=source
    )
    noise = conv.weight.grad - 0.1 * g_old
    assert noise.std().item() / (expected * g_old.std().item()) == pytest.approx(1.0, abs=0.03)


@pytest.mark.parametrize("source", ["unscaled", "scaled"])
def test_ge_noise_std_of_a_zero_gradient_is_the_epsilon(source):
    """std(g) = 0: the noise is N(0, (1e-8)^2), i.e. the generator's standard normal draw times 1e-8."""
    conv = torch.nn.Conv2d(4, 4, 3, bias=False)
    conv.weight.grad = torch.zeros_like(conv.weight)
    ogm.modulate_gradients(
        conv, other_conv(), 0.5, 1.0, True, True, torch.Generator().manual_seed(0), std_source=source
    )
    want = torch.randn(conv.weight.shape, generator=torch.Generator().manual_seed(0)) * 1e-8
    torch.testing.assert_close(conv.weight.grad, want, rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------------------------------------------
# end to end: equivalence with the baseline, windows, frozen kernels, heads, resume, smoke
# ----------------------------------------------------------------------------------------------------------------
def test_alpha0_ogm_is_baseline_bitwise(tiny_data, tmp_path, baseline_2ep):
    run = run_inproc(
        "ogm.py", tiny_data, tmp_path / "a0", *"--epochs 2 --max-steps 2 --modulation ogm --alpha 0".split()
    )
    assert [r["train/coeff_audio"] for r in history(run)] == [1.0, 1.0]
    c, b = ckpt(run), ckpt(baseline_2ep)
    assert same_state(c["model"], b["model"])
    assert same_state(c["optimizer"]["state"][0], b["optimizer"]["state"][0])
    ogm_keys = ("train/modulated_audio_frac", "train/coeff_audio", "train/coeff_visual")
    strip = [{k: v for k, v in r.items() if k not in ogm_keys} for r in no_timing(history(run))]
    assert strip == no_timing(history(baseline_2ep))
    # the control: with alpha > 0 the same run differs (so the comparison above can fail)
    run = run_inproc("ogm.py", tiny_data, tmp_path / "a8", *"--epochs 2 --max-steps 2 --modulation ogm".split())
    assert not same_state(ckpt(run)["model"], b["model"])


def test_window_start_respected(tiny_data, tmp_path):
    base = run_inproc("baseline.py", tiny_data, tmp_path / "b", *"--epochs 1 --max-steps 2".split())
    run = run_inproc("ogm.py", tiny_data, tmp_path / "o", *"--epochs 1 --max-steps 2 --modulation-starts 1".split())
    assert same_state(ckpt(run)["model"], ckpt(base)["model"])  # ogm_ge: not even noise outside the window


def test_window_end_is_inclusive_end_to_end(tiny_data, tmp_path):
    """--modulation-ends 0: epoch 0 is modulated (k < 1 logged), epoch 1 is not (k = 1 on both sides)."""
    run = run_inproc("ogm.py", tiny_data, tmp_path / "o", *"--epochs 2 --max-steps 1 --modulation-ends 0".split())
    first, second = history(run)
    assert min(first["train/coeff_audio"], first["train/coeff_visual"]) < 1.0
    rho = first["train/ratio"]  # s_a / s_v of the one step: k = 1 - tanh(0.8 rho) on the higher-scoring side
    k_dominant = 1 - math.tanh(0.8 * max(rho, 1 / rho))
    assert abs(rho - 1) > 1e-3 and first["train/modulated_audio_frac"] == float(rho > 1)
    assert (first["train/coeff_audio"], first["train/coeff_visual"]) == pytest.approx(
        (k_dominant, 1.0) if rho > 1 else (1.0, k_dominant), rel=1e-5
    )
    assert second["train/coeff_audio"] == second["train/coeff_visual"] == 1.0


def one_step_vs_joint(tiny_data, tmp_path, *flags):
    """(ogm.py model, baseline.py model, initial parameters) after one SGD step without weight decay."""
    one = ("--epochs", 1, "--max-steps", 1, "--weight-decay", 0)
    torch.manual_seed(0)  # the script's initialisation: seed, then the model is the first draw
    init = {n: p.detach().clone() for n, p in AVClassifier(6, "concat").named_parameters()}
    joint = ckpt(run_inproc("baseline.py", tiny_data, tmp_path / "joint", *one))["model"]
    return ckpt(run_inproc("ogm.py", tiny_data, tmp_path / "ogm", *one, *flags))["model"], joint, init


def test_modulation_none_is_joint_training(tiny_data, tmp_path):
    m, joint, _ = one_step_vs_joint(tiny_data, tmp_path, "--modulation", "none")
    assert same_state(m, joint)
    assert history(sorted(glob.glob(str(tmp_path / "ogm" / "*")))[-1])[0]["train/coeff_audio"] == 1.0


@pytest.mark.parametrize("target", ["both", "dominant"])
def test_ge_noise_in_the_training_loop(tiny_data, tmp_path, target):
    """--alpha 0 (k = 1) with GE: the loop adds noise to the conv kernels' gradients, so after one step exactly the
    conv kernels of the noised encoder(s) differ from joint training (both encoders by default; only the modulated
    one with --ge-target dominant); BatchNorm and the head moved as in joint training."""
    m, joint, init = one_step_vs_joint(tiny_data, tmp_path, "--alpha", 0, "--ge-target", target)
    # ge_noise with a tie (alpha 0 does not change which side is dominant): the side the loop logs
    hist = history(sorted(glob.glob(str(tmp_path / "ogm" / "*")))[-1])
    audio_dominant = hist[0]["train/modulated_audio_frac"] == 1.0
    noised = {"audio_net.", "visual_net."} if target == "both" else {"audio_net." if audio_dominant else "visual_net."}
    n_noised = 0
    for name, value in m.items():
        if name in init and value.dim() == 4 and name.split(".")[0] + "." in noised:
            assert not torch.equal(value, joint[name]), name
            n_noised += 1
        else:
            assert torch.equal(value, joint[name]), name
    assert n_noised == 20 * len(noised)


def test_tpami_warmup_is_baseline(tiny_data, tmp_path):
    """Journal preset: warm-up epochs are bitwise joint training, the first epoch after them is modulated.

    The real-dataset rows warm up for epochs 0-5 (checked in the table); the synthetic row scales that to epoch 0.
    """
    assert all(row["warmup_epochs"] == 6 for d, row in ogm.OGM_PRESETS["tpami"].items() if d != "synthetic")
    assert ogm.OGM_PRESETS["tpami"]["synthetic"]["warmup_epochs"] == 1
    extra = ("--epochs", 2, "--max-steps", 2, "--stop-after-epochs", 1)
    base = run_inproc("baseline.py", tiny_data, tmp_path / "b", *extra)
    run = run_inproc("ogm.py", tiny_data, tmp_path / "o", *extra, "--preset", "tpami")
    assert ckpt(run)["epoch"] == 0 and ckpt(run)["args"]["alpha"] == 2.6
    assert same_state(ckpt(run)["model"], ckpt(base)["model"])
    assert history(run)[0]["train/coeff_audio"] == history(run)[0]["train/coeff_visual"] == 1.0
    run_inproc("baseline.py", tiny_data, tmp_path / "b", "--resume", base)
    with trace.tracing(str(tmp_path / "trace")):
        run_inproc("ogm.py", tiny_data, tmp_path / "o", "--resume", run)
    assert ckpt(run)["epoch"] == 1 and not same_state(ckpt(run)["model"], ckpt(base)["model"])
    with open(tmp_path / "trace" / "rank0.jsonl") as f:  # the steps of epoch 1: modulated with the preset's alpha 2.6
        steps = [json.loads(line)["step"] for line in f]
    assert len(steps) == 2
    for s in steps:
        rho = max(s["train/ratio"], 1 / s["train/ratio"])
        assert min(s["train/coeff_audio"], s["train/coeff_visual"]) == pytest.approx(1 - math.tanh(2.6 * rho))
        assert max(s["train/coeff_audio"], s["train/coeff_visual"]) == 1.0


def test_dominant_conv_kernels_frozen_with_k0_end_to_end(tiny_data, tmp_path):
    """alpha = 100 makes k exactly 0: after one SGD step (no weight decay) exactly the dominant encoder's conv
    kernels are still at their initial values; its BN parameters, the other encoder and the head moved as in joint
    training."""
    one = ("--epochs", 1, "--max-steps", 1, "--weight-decay", 0)
    torch.manual_seed(0)  # the script's initialisation: seed, then the model is the first draw
    init = dict(AVClassifier(6, "concat").named_parameters())
    joint = ckpt(run_inproc("baseline.py", tiny_data, tmp_path / "joint", *one))["model"]
    run = run_inproc("ogm.py", tiny_data, tmp_path / "ogm", *one, *"--modulation ogm --alpha 100".split())
    m = ckpt(run)["model"]
    dominant = "audio_net." if history(run)[0]["train/modulated_audio_frac"] == 1.0 else "visual_net."
    n_frozen = 0
    for name, value in m.items():
        if name.startswith(dominant) and value.dim() == 4:
            assert torch.equal(value, init[name]) and not torch.equal(value, joint[name]), name
            n_frozen += 1
        else:
            assert torch.equal(value, joint[name]), name
    assert n_frozen == 20


def test_imbalance_smoke(tmp_path):
    root = tmp_path / "data"
    generate(str(root / "synthetic"), n_train=64, n_test=12, audio_snr=10, visual_strength=0.1, uninformative_audio=0.0)
    run = run_inproc("ogm.py", root, tmp_path / "runs", *"--epochs 2 --batch-size 8".split())
    second = history(run)[1]
    assert second["train/modulated_audio_frac"] > 0.8
    assert second["train/coeff_audio"] < 1.0 and second["train/ratio"] > 1.0


def test_heads(tiny_data, tmp_path, capsys):
    """FiLM has no unimodal logits for the scores: not among ogm.py's --fusion choices. sum splits exactly; gated
    scores each modality by the self-gate logits of models.py."""
    with pytest.raises(SystemExit) as e:
        run_inproc("ogm.py", tiny_data, tmp_path, "--fusion", "film")
    assert e.value.code == 2 and "--fusion: invalid choice: 'film'" in capsys.readouterr().err
    for extra in (["--fusion", "sum"], ["--fusion", "gated"]):
        run = run_inproc("ogm.py", tiny_data, tmp_path / extra[1], *"--epochs 1 --max-steps 1".split(), *extra)
        assert min(history(run)[0]["train/coeff_audio"], history(run)[0]["train/coeff_visual"]) < 1.0


def test_resume_is_exact(tiny_data, tmp_path):
    """ogm_ge (the default): two epochs in one go == one epoch, stop, --resume (model, optimizer, GE noise stream)."""
    straight = run_inproc("ogm.py", tiny_data, tmp_path / "s", *"--epochs 2 --max-steps 2".split())
    part = run_inproc("ogm.py", tiny_data, tmp_path / "p", *"--epochs 2 --max-steps 2 --stop-after-epochs 1".split())
    assert ckpt(part)["epoch"] == 0
    run_inproc("ogm.py", tiny_data, tmp_path / "p", "--resume", part)
    a, b = ckpt(straight), ckpt(part)
    assert b["epoch"] == 1 and same_state(a["model"], b["model"]) and torch.equal(a["noise_rng"], b["noise_rng"])
    assert no_timing(history(straight)) == no_timing(history(part))


def test_smoke_cli(tiny_data, tmp_path):
    proc, run = run_script("ogm.py", tiny_data, tmp_path, *"--epochs 1 --max-steps 2".split())
    r = read_results(run)
    for key in SHARED_KEYS + ["train/modulated_audio_frac"]:
        assert key in r["last"], key
    assert 0 <= r["best"]["test/acc"] <= 1 and r["args"]["alpha"] == 0.8 and r["args"]["modulation"] == "ogm_ge"
