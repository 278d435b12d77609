"""DGL (dgl.py): the properties listed in docs/dgl.md (Tests), on CPU with tiny tensors and tiny synthetic data."""

import copy
import json
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import METRIC_KEYS, history, make_optimizer, read_results, run_inproc, run_script

import dgl
from common.models import AVClassifier

B, C = 4, 6
ROLES = ("audio_net", "visual_net", "head")


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, 1, 32, 32, generator=g), torch.randn(B, 3, 1, 32, 32, generator=g), torch.tensor([0, 1, 2, 3])


@pytest.fixture(scope="module")
def models():
    """One initial model per fusion head, with a non-zero class-dependent bias (the init bias is zero)."""
    out = {}
    for fusion in ("concat", "sum", "gated"):
        torch.manual_seed(0)
        m = AVClassifier(C, fusion)
        with torch.no_grad():
            for mod in m.head.modules():
                if isinstance(mod, torch.nn.Linear):
                    mod.bias.copy_(torch.linspace(-1, 1, mod.bias.numel()))
        out[fusion] = m
    return out


def grads_of(module):
    """Gradients by name; None (no gradient at all) stays None."""
    return {n: (None if p.grad is None else p.grad.clone()) for n, p in module.named_parameters()}


def is_zero(g):
    return g is None or torch.count_nonzero(g) == 0


def forward_backward(model0, batch, part, alpha=4.0, impl="single-pass", dtype=torch.float32, quirk=False, clip=0.0):
    """A fresh copy of model0; back-propagate `part` = "fused", "unimodal" or "full" (dgl_backward with `impl`)."""
    model = copy.deepcopy(model0).to(dtype)
    audio, visual, y = batch
    z, z_a, z_v = dgl.forward(model, audio.to(dtype), visual.to(dtype), impl, quirk)  # what the training loop calls
    loss, loss_f, loss_a, loss_v = dgl.dgl_loss(z, z_a, z_v, y, alpha)
    if part == "fused":
        loss_f.backward()
    elif part == "unimodal":
        (alpha * (loss_a + loss_v)).backward()
    else:
        dgl.dgl_backward(model.head, loss, loss_f, loss_a, loss_v, alpha, impl)
    if clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    return model, {r: grads_of(getattr(model, r)) for r in ROLES}


def run_inprocess(runs_dir, data_root, *extra):
    return run_inproc("dgl.py", data_root, runs_dir, *extra)


def final_weights(run_dir):
    return torch.load(os.path.join(run_dir, "last.pt"), map_location="cpu", weights_only=False)["model"]


# ---------------------------------------------------------------------------------------------------------------
# which loss reaches which parameters
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fusion", ["concat", "sum", "gated"])
def test_fused_loss_reaches_only_the_head(models, batch, fusion):
    _, g = forward_backward(models[fusion], batch, "fused")
    assert all(is_zero(x) for r in ("audio_net", "visual_net") for x in g[r].values())
    assert all(not is_zero(x) for x in g["head"].values())  # every head parameter learns from L_f


@pytest.mark.parametrize("fusion", ["concat", "sum", "gated"])
def test_unimodal_losses_reach_only_the_encoders(models, batch, fusion):
    _, g = forward_backward(models[fusion], batch, "unimodal")
    assert all(is_zero(x) for x in g["head"].values())
    for r in ("audio_net", "visual_net"):
        assert sum(0 if x is None else x.abs().sum() for x in g[r].values()) > 0


def test_full_loss_separates_exactly(models, batch):
    """Encoders: full-loss gradient == unimodal part alone; head: == fused part alone (bitwise in fp32)."""
    _, full = forward_backward(models["concat"], batch, "full")
    _, uni = forward_backward(models["concat"], batch, "unimodal")
    _, fused = forward_backward(models["concat"], batch, "fused")
    for r, ref in (("audio_net", uni), ("visual_net", uni), ("head", fused)):
        for n, g in full[r].items():
            torch.testing.assert_close(g, ref[r][n], rtol=0, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------------
# linearity in alpha
# ---------------------------------------------------------------------------------------------------------------
def test_doubling_alpha_doubles_encoder_gradients_only(models, batch):
    _, g1 = forward_backward(models["concat"], batch, "full", alpha=2.0)
    _, g2 = forward_backward(models["concat"], batch, "full", alpha=4.0)
    for r in ("audio_net", "visual_net"):
        for n, g in g1[r].items():
            torch.testing.assert_close(g2[r][n], 2 * g, rtol=1e-6, atol=1e-6)
    for n, g in g1["head"].items():
        assert torch.equal(g2["head"][n], g)


def test_alpha_zero_leaves_the_encoders_unchanged(models, batch):
    model = copy.deepcopy(models["concat"])
    start = {k: v.clone() for k, v in model.state_dict().items()}
    opt = make_optimizer(SimpleNamespace(optimizer="sgd", lr=0.1, weight_decay=0.0), model.parameters())
    audio, visual, y = batch
    for _ in range(3):
        a, v = model.audio_net(audio), model.visual_net(visual)
        loss, loss_f, loss_a, loss_v = dgl.dgl_loss(*dgl.dgl_logits(model.head, a, v, dgl.readout), y, 0.0)
        opt.zero_grad()
        dgl.dgl_backward(model.head, loss, loss_f, loss_a, loss_v, 0.0)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 40.0)
        opt.step()
    for name, p in model.named_parameters():
        changed = not torch.equal(p, start[name])
        assert changed == name.startswith("head."), name  # the head trains, no encoder weight moves


# ---------------------------------------------------------------------------------------------------------------
# single pass == the release's two passes; the gated head
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fusion,quirk", [("concat", False), ("sum", False), ("gated", False), ("gated", True)])
def test_single_pass_equals_two_pass(models, batch, fusion, quirk):
    """Max abs difference <= 1e-7 in fp32 and exactly 0 in float64, before and after clipping at 40."""
    for dtype, tol in ((torch.float32, 1e-7), (torch.float64, 0.0)):
        m1, _ = forward_backward(models[fusion], batch, "full", dtype=dtype, quirk=quirk)
        m2, _ = forward_backward(models[fusion], batch, "full", impl="two-pass", dtype=dtype, quirk=quirk)
        for clipped in (False, True):
            if clipped:
                assert torch.nn.utils.clip_grad_norm_(m1.parameters(), 40.0) > 40  # precondition: clipping acts
                torch.nn.utils.clip_grad_norm_(m2.parameters(), 40.0)
            for (n, p1), p2 in zip(m1.named_parameters(), m2.parameters()):
                if p1.grad is None or p2.grad is None:
                    assert p1.grad is None and p2.grad is None, n
                else:
                    assert (p1.grad - p2.grad).abs().max() <= tol, (dtype, clipped, n)


def test_gated_head_default_trains_projections_quirk_freezes_them(models, batch):
    _, g = forward_backward(models["gated"], batch, "full")
    assert not is_zero(g["head"]["fc_x.weight"]) and not is_zero(g["head"]["fc_y.weight"])
    model, g = forward_backward(models["gated"], batch, "full", quirk=True)
    assert g["head"]["fc_x.weight"] is None and g["head"]["fc_y.weight"] is None
    assert not is_zero(g["head"]["fc_out.weight"])
    opt = make_optimizer(SimpleNamespace(optimizer="sgd", lr=0.1, weight_decay=1e-4), model.parameters())
    opt.step()  # SGD skips parameters without a gradient, weight decay included
    for n in ("fc_x.weight", "fc_x.bias", "fc_y.weight", "fc_y.bias"):
        assert torch.equal(model.head.get_parameter(n), models["gated"].head.get_parameter(n))


@pytest.mark.parametrize("fusion", ["concat", "sum"])
def test_gated_quirk_refuses_other_heads(models, batch, fusion):
    audio, visual, _ = batch
    with pytest.raises(ValueError, match="--fusion gated"):
        dgl.forward(copy.deepcopy(models[fusion]), audio, visual, "single-pass", True)


def test_film_head_is_refused(tiny_data, tmp_path, capsys):
    """FiLM has no unimodal logits: not among dgl.py's --fusion choices (argparse's one-line error, exit status 2)."""
    with pytest.raises(SystemExit) as e:
        run_inprocess(tmp_path, tiny_data, *"--epochs 1 --max-steps 1 --fusion film".split())
    assert e.value.code == 2 and "--fusion: invalid choice: 'film'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# forward values, the head as a linear probe, clipping
# ---------------------------------------------------------------------------------------------------------------
def test_forward_values(models, batch):
    model = copy.deepcopy(models["concat"])
    audio, visual, y = batch
    a, v = model.audio_net(audio), model.visual_net(visual)
    z, z_a, z_v = dgl.dgl_logits(model.head, a, v, dgl.readout)
    assert torch.equal(z, model.head(a, v)[2])  # detaching changes no value
    W, b = model.head.fc_out.weight, model.head.fc_out.bias
    torch.testing.assert_close(z_a, a @ W[:, :512].T + b, atol=1e-5, rtol=0)
    torch.testing.assert_close(z_v, v @ W[:, 512:].T + b, atol=1e-5, rtol=0)
    torch.testing.assert_close(z_a + z_v - b, z, atol=1e-5, rtol=0)


def test_head_is_a_linear_probe(models, batch):
    """The head's gradient == that of a fresh Linear with the same weights, trained by CE on the constant [a ; v]."""
    model, g = forward_backward(models["concat"], batch, "full")
    audio, visual, y = batch
    ref_model = copy.deepcopy(models["concat"])
    with torch.no_grad():
        x = torch.cat((ref_model.audio_net(audio), ref_model.visual_net(visual)), 1)
    probe = torch.nn.Linear(1024, C)
    probe.load_state_dict(models["concat"].head.fc_out.state_dict())
    F.cross_entropy(probe(x), y).backward()
    torch.testing.assert_close(g["head"]["fc_out.weight"], probe.weight.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g["head"]["fc_out.bias"], probe.bias.grad, rtol=1e-5, atol=1e-7)


def test_clipping_at_40_by_default(models, batch):
    for dataset in dgl.PRESETS:
        args = dgl.parse_args(["--dataset", dataset])
        assert args.clip_grad == 40.0
    model, _ = forward_backward(models["concat"], batch, "full")
    assert torch.nn.utils.clip_grad_norm_(model.parameters(), 40.0) > 40  # precondition: this gradient is clipped
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert norm <= 40 + 1e-4


# ---------------------------------------------------------------------------------------------------------------
# end to end: smoke, two-pass run, resume
# ---------------------------------------------------------------------------------------------------------------
SHARED_KEYS = METRIC_KEYS  # the metric vocabulary (tests/conftest.py); DGL logs no coefficients
EXTRA_KEYS = [
    "train/loss_fused",
    "train/grad_norm_audio",
    "train/grad_norm_visual",
    "train/grad_norm_head",
    "train/clip_factor",
]


def test_smoke(tiny_data, tmp_path):
    proc, run = run_script("dgl.py", tiny_data, tmp_path, *"--epochs 2 --max-steps 2".split())
    r = read_results(run)
    for key in SHARED_KEYS + EXTRA_KEYS:
        assert key in r["last"], key
    assert 0 <= r["best"]["test/acc"] <= 1
    assert r["args"]["clip_grad"] == 40.0 and r["args"]["alpha"] == 4.0
    m = r["last"]
    expected = m["train/loss_fused"] + 4.0 * (m["train/loss_audio"] + m["train/loss_visual"])
    assert m["train/loss"] == pytest.approx(expected, rel=1e-5)
    assert 0 < m["train/clip_factor"] <= 1


@pytest.fixture(scope="module")
def two_epoch_run(tiny_data, tmp_path_factory):
    return run_inprocess(tmp_path_factory.mktemp("dgl2"), tiny_data, *"--epochs 2 --max-steps 2".split())


def test_two_pass_run_matches_single_pass_run(two_epoch_run, tiny_data, tmp_path):
    run = run_inprocess(tmp_path, tiny_data, *"--epochs 2 --max-steps 2 --dgl-impl two-pass".split())
    a, b = final_weights(two_epoch_run), final_weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_continues_exactly(two_epoch_run, tiny_data, tmp_path):
    run = run_inprocess(tmp_path, tiny_data, *"--epochs 2 --max-steps 2 --stop-after-epochs 1".split())
    assert len(history(run)) == 1
    run_inprocess(tmp_path, tiny_data, "--resume", run)
    assert [m["test/acc"] for m in history(run)] == [m["test/acc"] for m in history(two_epoch_run)]
    a, b = final_weights(two_epoch_run), final_weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_clipping_in_the_training_loop(tiny_data, tmp_path):
    """One step with --lr 1 --weight-decay 0 (the first SGD step moves every parameter by minus its gradient):
    --clip-grad 0.05 makes that step's norm 0.05, and the logged clip factor is 0.05 over the logged norm before
    clipping; --clip-grad 0 leaves the step unclipped (far larger) and logs factor 1, and so does a clip above the
    norm (--clip-grad 100000: the factor is capped at 1)."""
    torch.manual_seed(0)  # the script's initialisation: seed, then the model is the first draw
    init = {n: p.detach().clone() for n, p in AVClassifier(C).named_parameters()}
    steps, logs = {}, {}
    for clip in ("0.05", "0", "100000"):
        run = run_inproc(
            "dgl.py",
            tiny_data,
            tmp_path / clip,
            *"--epochs 1 --max-steps 1 --lr 1 --weight-decay 0 --clip-grad".split(),
            clip,
        )
        m = torch.load(os.path.join(run, "last.pt"), map_location="cpu", weights_only=False)["model"]
        steps[clip] = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(m[n] - p) for n, p in init.items()])
        ).item()
        with open(os.path.join(run, "metrics.jsonl")) as f:
            logs[clip] = json.loads(f.readline())
    assert steps["0.05"] == pytest.approx(0.05, rel=1e-3)
    total = sum(logs["0.05"][f"train/grad_norm_{k}"] ** 2 for k in ("audio", "head", "visual")) ** 0.5
    assert total > 1.0 and logs["0.05"]["train/clip_factor"] == pytest.approx(0.05 / total, rel=1e-4)
    assert steps["0"] == pytest.approx(total, rel=1e-3) and logs["0"]["train/clip_factor"] == 1.0
    assert steps["100000"] == pytest.approx(total, rel=1e-3) and logs["100000"]["train/clip_factor"] == 1.0
    assert "train/coeff_audio" not in logs["0"]  # DGL has no per-modality coefficient


def test_logged_ratio_is_a_quotient_of_the_scores(tiny_data, tmp_path):
    """At initialisation both zero-fill predictions are near uniform, so s_a ~ s_v ~ B / C: the logged ratio s_a / s_v
    is near 1 (a product of the two scores would be near (B / C)^2 = 0.44)."""
    row = history(run_inprocess(tmp_path, tiny_data, *"--epochs 1 --max-steps 1".split()))[0]
    assert 0.7 < row["train/ratio"] < 1.5  # measured 1.21
