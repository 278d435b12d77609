"""opm.py: the properties listed in docs/opm.md (Tests), on CPU and tiny synthetic data.

Unit tests import the script (`import opm`); end-to-end tests run it in this process with `runpy` (the same code
path as `python opm.py ...`, without paying the torch/torchvision import for every run), one `subprocess` smoke test.
"""

import copy
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import COEFF_KEYS, METRIC_KEYS, ckpt, history, read_results, run_inproc, run_script, same_state

import opm  # noqa: E402  (conftest puts the repo root on sys.path)
from common import distributed
from common.data import build_datasets, make_loaders
from common.evaluate import evaluate
from common.models import AVClassifier, unimodal_logits
from common.synthetic import generate
from tools import trace

SHARED_KEYS = METRIC_KEYS + COEFF_KEYS  # the metric vocabulary (tests/conftest.py)
OPM_KEYS = ["train/drop_exec_frac", "train/drop_frac_audio", "train/drop_frac_visual", "train/rescale"]


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------
def shared_only(rows):
    """The keys baseline.py logs too, without timings and the method's coefficients."""
    drop = ("charts/samples_per_sec", "train/coeff_audio", "train/coeff_visual")
    return [{k: v for k, v in r.items() if k == "epoch" or (k in SHARED_KEYS and k not in drop)} for r in rows]


def fresh_opm_gen_state(seed=0):
    return torch.Generator().manual_seed(seed + 1_000_000).get_state()


@pytest.fixture(scope="module")
def baseline_2ep(tiny_data, tmp_path_factory):
    return run_inproc("baseline.py", tiny_data, tmp_path_factory.mktemp("base"), *"--epochs 2 --max-steps 2".split())


@pytest.fixture(scope="module")
def opm_2ep(tiny_data, tmp_path_factory):
    """OPM on from epoch 0 and executed at every step: the strongest setting for the end-to-end checks."""
    return run_inproc(
        "opm.py",
        tiny_data,
        tmp_path_factory.mktemp("opm"),
        *"--epochs 2 --max-steps 2 --warmup-epochs 0 --p-exe 1".split(),
    )


# ----------------------------------------------------------------------------------------------------------------
# the maths: drop probabilities, masks, rescaling, gradients, empty samples
# ----------------------------------------------------------------------------------------------------------------
RHOS = [1.01, 1.2, 1.5, 2, 3, 1e6]
Q_TABLE = {(0.5, 0.5): [0.503, 0.549, 0.616, 0.690, 0.741, 0.75], (0.4, 0.5): [0.402, 0.440, 0.492, 0.552, 0.593, 0.60]}


@pytest.mark.parametrize("q_base,lam", sorted(Q_TABLE))
def test_drop_probability_table(q_base, lam):
    for rho, q in zip(RHOS, Q_TABLE[(q_base, lam)]):
        # abs 1e-3: two table entries are rounded up from x.xxx4999 (0.5025 - 8e-8 and 0.4395 - 2.5e-5)
        assert opm.drop_probabilities(4.0 * rho, 4.0, q_base, lam) == (pytest.approx(q, abs=1e-3), 0.0)
        assert opm.drop_probabilities(4.0, 4.0 * rho, q_base, lam) == (0.0, pytest.approx(q, abs=1e-3))
    assert opm.drop_probabilities(3.0, 3.0, q_base, lam) == (0.0, 0.0)


def test_drop_probabilities_one_nonzero_and_clipped():
    g = torch.Generator().manual_seed(0)
    for _ in range(2000):
        s_a, s_v = (torch.rand(2, generator=g) * 32 + 1e-6).tolist()
        q_base, lam = torch.rand(2, generator=g).tolist()
        q_a, q_v = opm.drop_probabilities(s_a, s_v, q_base, lam * 2)
        assert (q_a > 0) + (q_v > 0) == (1 if q_base > 0 else 0)
        assert (q_a > 0) == (s_a > s_v and q_base > 0)
    for s in [(1e-30, 1.0), (1.0, 1e-30), (1e30, 1.0), (1.0, 1e30)]:
        assert all(0.0 <= q <= 1.0 for q in opm.drop_probabilities(*s, 0.9, 1.0))
    assert max(opm.drop_probabilities(1e6, 1.0, 0.9, 1.0)) == 1.0  # 0.9 (1 + tanh(big)) = 1.8, clipped


def test_rescale_factors():
    for q, f in [(0.5, 1.333), (0.616, 1.445), (0.690, 1.527), (0.75, 1.600)]:
        assert tuple(round(x, 3) for x in opm.rescale_factors(q, 0.0, "mean")) == (f, f)
        assert tuple(round(x, 3) for x in opm.rescale_factors(0.0, q, "mean")) == (f, f)
    assert opm.rescale_factors(0.5, 0.0, "per-modality") == (2.0, 1.0)
    assert opm.rescale_factors(0.5, 0.0, "none") == (1.0, 1.0)


@pytest.mark.parametrize("dominant", ["audio", "visual"])
def test_weak_modality_never_masked(dominant):
    """Scores with one dominant side, then opm_drop over many steps: every row of the weaker modality's features
    comes out as its input times the rescale factor (none zeroed), while the dominant side loses rows."""
    gen = torch.Generator().manual_seed(0)
    s = (20.0, 10.0) if dominant == "audio" else (10.0, 20.0)
    q_a, q_v = opm.drop_probabilities(*s, 0.5, 0.5)
    f = opm.rescale_factors(q_a, q_v)[0]
    lost_dominant = 0
    for _ in range(50):
        a, v, y = torch.randn(16, 512) + 3, torch.randn(16, 512) + 3, torch.arange(16)
        a2, v2, y2, executed, frac = opm.opm_drop(a, v, y, q_a, q_v, 1.0, gen)
        assert executed and torch.equal(y2, y)  # the weak side keeps every row, so no sample is removed
        weak, weak_in, strong, strong_frac = (v2, v, a2, frac[0]) if dominant == "audio" else (a2, a, v2, frac[1])
        torch.testing.assert_close(weak, weak_in * f)
        assert frac == ((strong_frac, 0.0) if dominant == "audio" else (0.0, strong_frac))
        lost_dominant += int((strong.abs().sum(1) == 0).sum())
    assert lost_dominant > 0.4 * 50 * 16


def test_drop_frequencies():
    gen = torch.Generator().manual_seed(0)
    q_a, p_exe, b, n = 0.62, 0.7, 8, 10_000
    executed, dropped = 0, 0.0
    for _ in range(n):
        if opm.execute_drop(p_exe, gen):
            executed += 1
            keep_a, keep_v = opm.feature_masks(q_a, 0.0, b, gen)
            dropped += 1 - keep_a.mean().item()
            assert keep_v.min() == 1
    assert abs(executed / n - p_exe) < 0.02
    assert abs(dropped / executed - q_a) < 0.02
    assert not opm.execute_drop(0.0, gen) and opm.execute_drop(1.0, gen)


def test_masked_values_and_rescale():
    torch.manual_seed(0)
    a, v, y = torch.randn(6, 512), torch.randn(6, 512), torch.arange(6)
    keep_a, keep_v = torch.tensor([1.0, 0, 1, 0, 0, 1]), torch.ones(6)
    q_a, q_v = 0.616, 0.0
    a_t, v_t, y_t = opm.drop_features(a, v, y, keep_a, keep_v, q_a, q_v)
    theta = (q_a + q_v) / 2
    assert torch.equal(y_t, y)  # the visual side is kept everywhere: no sample removed
    assert torch.all(a_t[keep_a == 0] == 0)
    torch.testing.assert_close(a_t[keep_a == 1], a[keep_a == 1] / (1 - theta), rtol=1e-6, atol=0)
    torch.testing.assert_close(v_t, v / (1 - theta), rtol=1e-6, atol=0)  # the weaker side is rescaled too


def test_gradient_through_the_drop():
    torch.manual_seed(0)
    head = AVClassifier(6, "concat").head
    a = torch.randn(6, 512, requires_grad=True)
    v = torch.randn(6, 512, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    keep_a, keep_v, q_a, q_v = torch.tensor([1.0, 0, 1, 1, 0, 1]), torch.ones(6), 0.69, 0.0
    theta = (q_a + q_v) / 2
    a_t, v_t, y_t = opm.drop_features(a, v, y, keep_a, keep_v, q_a, q_v)
    _, _, z = head(a_t, v_t)
    F.cross_entropy(z, y_t).backward()
    assert torch.all(a.grad[keep_a == 0] == 0)
    w_a = head.fc_out.weight[:, :512].detach()
    expected = (torch.softmax(z, 1) - F.one_hot(y_t, 6)).detach() @ w_a / (1 - theta) / len(y_t)
    torch.testing.assert_close(a.grad[keep_a == 1], expected[keep_a[y_t] == 1], atol=1e-6, rtol=0)
    # the release's own step (its custom autograd function, theta's gradient included or not) is compared with the
    # training loop in tests/test_parity_opm.py


def test_scores_do_not_train():
    """opm_scores of logits that carry a graph return a tensor without one, and computing them leaves the gradients
    of CE(head(a~, v~), y_kept) unchanged."""
    torch.manual_seed(0)
    model = AVClassifier(6, "concat")
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    audio, visual = torch.randn(4, 1, 33, 33, generator=g), torch.randn(4, 3, 1, 32, 32, generator=g)
    y = torch.arange(4)
    keep_a, keep_v = torch.tensor([1.0, 0, 1, 0]), torch.ones(4)
    a, v = model.audio_net(audio), model.visual_net(visual)
    z_a, z_v = unimodal_logits(model.head, *model.head(a, v)[:2], bias="half")
    assert z_a.requires_grad and z_v.requires_grad  # precondition: the logits carry a graph
    s = opm.opm_scores(z_a, z_v, y)
    assert not s.requires_grad and s.grad_fn is None
    a, v, y_k = opm.drop_features(a, v, y, keep_a, keep_v, 0.6, 0.0)
    F.cross_entropy(model.head(a, v)[2], y_k).backward()
    a_r, v_r, y_r = opm.drop_features(ref.audio_net(audio), ref.visual_net(visual), y, keep_a, keep_v, 0.6, 0.0)
    F.cross_entropy(ref.head(a_r, v_r)[2], y_r).backward()
    got = {n: p.grad for n, p in model.named_parameters()}
    want = {n: p.grad for n, p in ref.named_parameters()}
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_scores_are_batch_sums():
    torch.manual_seed(0)
    z_a, z_v, y = torch.randn(8, 6), torch.randn(8, 6) * 3, torch.randint(0, 6, (8,))
    s = opm.opm_scores(z_a, z_v, y)
    assert s.shape == (2,) and not s.requires_grad
    for got, z in zip(s, (z_a, z_v)):
        assert got.item() == pytest.approx(sum(torch.softmax(z[i], 0)[y[i]].item() for i in range(8)), rel=1e-6)


def test_active_epochs():
    assert [opm.opm_active(e, 1) for e in (0, 1, 2, 99)] == [False, True, True, True]
    assert [opm.opm_active(e, 0, (2, 3)) for e in (1, 2, 3, 4)] == [False, True, True, False]
    assert [opm.opm_active(e, 3, (2, 5)) for e in (2, 3, 5, 6)] == [False, True, True, False]


def test_opm_drop_reports_the_drops_and_splits_the_global_batch():
    gen = torch.Generator().manual_seed(0)
    a, v, y = torch.randn(8, 512) + 5, torch.randn(8, 512) + 5, torch.arange(8)
    a_t, v_t, y_t, executed, (frac_a, frac_v) = opm.opm_drop(a, v, y, 0.5, 0.0, 1.0, gen)
    assert executed and torch.equal(y_t, y) and frac_v == 0.0
    assert frac_a == (a_t.abs().sum(1) == 0).float().mean().item() and 0 < frac_a < 1
    a_t, v_t, y_t, executed, (frac_a, frac_v) = opm.opm_drop(a, v, y, 0.0, 0.5, 1.0, gen)  # visual dominant
    assert frac_a == 0.0 and frac_v == (v_t.abs().sum(1) == 0).float().mean().item() and 0 < frac_v < 1
    assert opm.opm_drop(a, v, y, 0.5, 0.0, 0.0, gen)[3:] == (False, (0.0, 0.0))
    # two processes with 4 rows each draw the masks of the 8-row batch and keep their own rows
    state = torch.Generator().manual_seed(1).get_state()
    whole = opm.opm_drop(a, v, y, 0.5, 0.0, 1.0, torch.Generator().manual_seed(1))
    parts = []
    for rank in (0, 1):
        g = torch.Generator()
        g.set_state(state)
        rows = slice(4 * rank, 4 * rank + 4)
        parts.append(opm.opm_drop(a[rows], v[rows], y[rows], 0.5, 0.0, 1.0, g, world_size=2, rank=rank))
    assert torch.equal(torch.cat([p[0] for p in parts]), whole[0])
    assert (parts[0][4][0] + parts[1][4][0]) / 2 == pytest.approx(whole[4][0])


def test_empty_sample_removal():
    gen = torch.Generator().manual_seed(0)
    keep_a, keep_v = opm.feature_masks(1.0, 1.0, 5, gen)
    assert keep_a.sum() == keep_v.sum() == 0
    a, v, y = torch.randn(5, 512), torch.randn(5, 512), torch.arange(5)
    a_t, v_t, y_t = opm.drop_features(a, v, y, keep_a, keep_v, 1.0, 1.0)
    assert a_t.shape == (0, 512) and v_t.shape == (0, 512) and y_t.numel() == 0
    keep_a, keep_v = torch.tensor([0.0, 1, 0, 1, 0]), torch.tensor([0.0, 1, 1, 0, 0])  # hand-made, both dropped: 0, 4
    a_t, v_t, y_t = opm.drop_features(a, v, y, keep_a, keep_v, 0.5, 0.5, rescale="none")
    assert y_t.tolist() == [1, 2, 3]
    assert torch.equal(a_t, a[[1, 2, 3]] * torch.tensor([1.0, 0, 1])[:, None])
    assert torch.equal(v_t, v[[1, 2, 3]] * torch.tensor([1.0, 1, 0])[:, None])


def test_empty_batches_skip_the_step(tiny_data, tmp_path, monkeypatch):
    """Every mask all zeros (torch.bernoulli patched): every step is skipped, so the parameters stay at their
    initial values (the script's seed-0 initialisation) and the optimizer never steps."""
    monkeypatch.setattr(torch, "bernoulli", lambda p, generator=None: torch.zeros_like(p))
    run = run_inproc(
        "opm.py", tiny_data, tmp_path / "o", *"--epochs 1 --max-steps 2 --warmup-epochs 0 --p-exe 1".split()
    )
    c = ckpt(run)
    torch.manual_seed(0)
    init = AVClassifier(6, "concat")
    assert all(torch.equal(c["model"][n], p) for n, p in init.named_parameters())
    assert c["optimizer"]["state"] == {}
    assert c["model"]["audio_net.trunk.bn1.num_batches_tracked"] == 2  # the encoders did run forward
    assert "train/loss" not in history(run)[0]  # no step was taken, so no training metric was logged


# ----------------------------------------------------------------------------------------------------------------
# end to end: equivalence with the baseline, warm-up, evaluation, heads, resume, smoke
# ----------------------------------------------------------------------------------------------------------------
def test_p_exe0_is_baseline_bitwise(tiny_data, tmp_path, baseline_2ep):
    run = run_inproc("opm.py", tiny_data, tmp_path, *"--epochs 2 --max-steps 2 --warmup-epochs 0 --p-exe 0".split())
    assert same_state(ckpt(run)["model"], ckpt(baseline_2ep)["model"])
    assert shared_only(history(run)) == shared_only(history(baseline_2ep))
    assert all(r["train/drop_exec_frac"] == 0 for r in history(run))


def test_q_base0_is_baseline_bitwise(tiny_data, tmp_path, baseline_2ep, opm_2ep):
    run = run_inproc(
        "opm.py",
        tiny_data,
        tmp_path,
        *"--epochs 2 --max-steps 2 --warmup-epochs 0 --p-exe 1 --q-base 0".split(),
    )
    assert all(r["train/drop_exec_frac"] == 1 for r in history(run))  # masks drawn at every step, all ones
    assert same_state(ckpt(run)["model"], ckpt(baseline_2ep)["model"])
    assert shared_only(history(run)) == shared_only(history(baseline_2ep))
    # the control: the same run with q_base 0.5 differs (so the comparisons above can fail)
    assert not same_state(ckpt(opm_2ep)["model"], ckpt(baseline_2ep)["model"])


def test_warmup_is_baseline_and_draws_nothing(tiny_data, tmp_path):
    """Epochs 0..W-1 are joint training bitwise and leave OPM's generator untouched; epoch W drops."""
    assert all(row["warmup_epochs"] == 6 for d, row in opm.OPM_PRESETS.items() if d != "synthetic")
    extra = ("--epochs", 3, "--max-steps", 2, "--stop-after-epochs", 2)
    base = run_inproc("baseline.py", tiny_data, tmp_path / "b", *extra)
    run = run_inproc("opm.py", tiny_data, tmp_path / "o", *extra, *"--warmup-epochs 2 --p-exe 1".split())
    c = ckpt(run)
    assert c["epoch"] == 1 and same_state(c["model"], ckpt(base)["model"])
    assert torch.equal(c["opm_rng"], fresh_opm_gen_state())
    assert all(r["train/drop_exec_frac"] == 0 and r["train/coeff_audio"] == 0 for r in history(run))
    run_inproc("baseline.py", tiny_data, tmp_path / "b", "--resume", base)
    run_inproc("opm.py", tiny_data, tmp_path / "o", "--resume", run)
    assert history(run)[2]["train/drop_exec_frac"] == 1.0
    assert not same_state(ckpt(run)["model"], ckpt(base)["model"])
    assert not torch.equal(ckpt(run)["opm_rng"], fresh_opm_gen_state())


def test_evaluation_has_no_drop(tiny_data, opm_2ep):
    """The logged test metrics of an OPM run equal a plain forward pass of its checkpoint, twice over."""
    args = opm.parse_args(["--dataset", "synthetic", "--data-root", tiny_data, "--batch-size", "4"])
    args.num_workers = 0
    _, test_set, classes = build_datasets(args)
    _, test_loader = make_loaders(test_set, test_set, args, torch.Generator())
    model = AVClassifier(len(classes), "concat", test_set.frontend)
    model.load_state_dict(ckpt(opm_2ep)["model"])
    model.eval()

    def plain(audio, visual):
        f_a, f_v, z = model(audio, visual)
        return (z, *unimodal_logits(model.head, f_a, f_v, bias="half"))

    first = evaluate(plain, test_loader, "cpu", len(classes))
    second = evaluate(plain, test_loader, "cpu", len(classes))
    logged = {k: v for k, v in history(opm_2ep)[-1].items() if k.startswith("test/")}
    assert first == second == logged
    assert history(opm_2ep)[-1]["train/drop_exec_frac"] == 1.0  # training did drop


def test_imbalance_smoke(tmp_path):
    root = tmp_path / "data"
    generate(str(root / "synthetic"), n_train=64, n_test=12, audio_snr=10, visual_strength=0.1, uninformative_audio=0.0)
    run = run_inproc("opm.py", root, tmp_path / "runs", *"--epochs 2 --batch-size 8".split())  # warm-up: epoch 0
    warm, on = history(run)
    assert warm["train/drop_exec_frac"] == 0 and warm["train/ratio"] > 1
    q_base = 0.5
    # q_v > 0 on a share of steps <= mean(q_v) / q_base; every other step has q_a > 0 (a tie has measure zero)
    assert on["train/coeff_visual"] / q_base < 0.2 and on["train/coeff_audio"] >= q_base * 0.8
    assert on["train/drop_frac_visual"] <= on["train/coeff_visual"] + 0.1
    assert on["train/drop_exec_frac"] > 0
    # dropped share on executed steps ~ q_a (8 samples per step: a loose tolerance)
    assert abs(on["train/drop_frac_audio"] / on["train/drop_exec_frac"] - on["train/coeff_audio"]) < 0.2


def test_heads(tiny_data, tmp_path, capsys):
    """FiLM has no unimodal logits for the scores: not among opm.py's --fusion choices. sum splits exactly; gated
    scores each modality by the self-gate logits of models.py."""
    with pytest.raises(SystemExit) as e:
        run_inproc("opm.py", tiny_data, tmp_path, "--fusion", "film")
    assert e.value.code == 2 and "--fusion: invalid choice: 'film'" in capsys.readouterr().err
    for extra in (["--fusion", "sum"], ["--fusion", "gated"]):
        run = run_inproc(
            "opm.py",
            tiny_data,
            tmp_path / extra[1],
            *"--epochs 1 --max-steps 2 --warmup-epochs 0 --p-exe 1".split(),
            *extra,
        )
        assert history(run)[0]["train/drop_exec_frac"] == 1.0


def test_resume_is_exact(tiny_data, tmp_path, opm_2ep):
    """Two epochs in one go == one epoch, stop, --resume (model, optimizer, OPM's generator)."""
    part = run_inproc(
        "opm.py",
        tiny_data,
        tmp_path,
        *"--epochs 2 --max-steps 2 --warmup-epochs 0 --p-exe 1 --stop-after-epochs 1".split(),
    )
    assert ckpt(part)["epoch"] == 0
    run_inproc("opm.py", tiny_data, tmp_path, "--resume", part)
    a, b = ckpt(opm_2ep), ckpt(part)
    assert b["epoch"] == 1 and same_state(a["model"], b["model"]) and torch.equal(a["opm_rng"], b["opm_rng"])
    timing = ("charts/samples_per_sec", "charts/epoch_time")
    strip = [{k: v for k, v in r.items() if k not in timing} for r in history(part)]
    assert strip == [{k: v for k, v in r.items() if k not in timing} for r in history(opm_2ep)]


def test_smoke_cli(tiny_data, tmp_path):
    proc, run = run_script("opm.py", tiny_data, tmp_path, *"--epochs 1 --max-steps 2".split())
    r = read_results(run)
    for key in SHARED_KEYS + OPM_KEYS:
        assert key in r["last"], key
    assert 0 <= r["best"]["test/acc"] <= 1 and r["args"]["q_base"] == 0.5 and r["args"]["p_exe"] == 0.7


def test_window_end_is_inclusive_end_to_end(tiny_data, tmp_path):
    """--opm-window 0 0 with --p-exe 1: epoch 0 drops (q > 0 on the dominant side, the drop executed), epoch 1 is
    past the window's end (q = 0 on both sides, nothing executed)."""
    run = run_inproc(
        "opm.py",
        tiny_data,
        tmp_path,
        *"--epochs 2 --max-steps 1 --warmup-epochs 0 --p-exe 1 --opm-window 0 0".split(),
    )
    first, second = history(run)
    assert first["train/drop_exec_frac"] == 1.0 and max(first["train/coeff_audio"], first["train/coeff_visual"]) > 0
    assert second["train/drop_exec_frac"] == 0.0
    assert second["train/coeff_audio"] == second["train/coeff_visual"] == 0.0


@pytest.mark.parametrize("q_base,lam", [(0.5, 0.5), (0.9, 1.0)])
def test_theta_loss_is_half_theta_squared_of_the_drop_probabilities(q_base, lam):
    """theta_loss = ((q_a + q_v) / 2)^2 / 2 with (q_a, q_v) = drop_probabilities of the logits' scores (clipped to 1:
    q_base 0.9, lambda 1), in both directions and on a tie; its gradient reaches the logits of both modalities
    through the dominant side's q, and none once that q is clipped at 1 or on a tie."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(8) % 4
    for boost_a, boost_v in [(2.0, 0.0), (0.0, 2.0), (1.0, 1.0), (0.1, 0.0)]:  # audio, visual, a tie, audio a little
        z = torch.randn(8, 4, generator=g, dtype=torch.float64)
        z_a = (z + boost_a * F.one_hot(y, 4)).requires_grad_()
        z_v = (z + boost_v * F.one_hot(y, 4)).requires_grad_()
        s_a, s_v = opm.opm_scores(z_a, z_v, y).tolist()
        assert (s_a > s_v, s_a == s_v) == (boost_a > boost_v, boost_a == boost_v)
        q_a, q_v = opm.drop_probabilities(s_a, s_v, q_base, lam)
        got = opm.theta_loss(z_a, z_v, y, q_base, lam)
        assert got.item() == pytest.approx(((q_a + q_v) / 2) ** 2 / 2, rel=1e-12, abs=0)
        g_a, g_v = torch.autograd.grad(got, (z_a, z_v))
        clipped = max(q_a, q_v) == 1.0 and q_base * (1 + lam * math.tanh(max(s_a / s_v, s_v / s_a) - 1)) > 1
        if q_a == q_v == 0 or clipped:  # a tie (no q), or the dominant q clipped at 1 (no gradient through it)
            assert not g_a.any() and not g_v.any()
        else:
            assert g_a.abs().max() > 1e-6 and g_v.abs().max() > 1e-6  # q depends on both scores


def test_release_theta_grad_refusals(tiny_data, tmp_path, monkeypatch, capsys):
    """--release-theta-grad differentiates theta = mean(q), so it needs --rescale mean; and one process, since it is
    the whole batch's theta (torchrun splits the batch): a one-line error each, before any data is read."""
    for rescale in ("per-modality", "none"):
        with pytest.raises(SystemExit) as e:
            run_inproc("opm.py", tiny_data, tmp_path, "--release-theta-grad", "--rescale", rescale)
        err = capsys.readouterr().err
        assert (
            e.value.code == 2
            and f"--release-theta-grad differentiates theta = mean(q) of --rescale mean, not --rescale {rescale}" in err
        )
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    with pytest.raises(SystemExit, match="--release-theta-grad needs one process"):
        run_inproc("opm.py", tiny_data, tmp_path, "--release-theta-grad")
    assert not os.listdir(tmp_path)


def test_rescale_factors_when_everything_is_dropped():
    """theta = 1 (mean) or q_m = 1 (per-modality): a factor of 0 instead of a division by zero."""
    assert opm.rescale_factors(1.0, 1.0, "mean") == (0.0, 0.0)
    assert opm.rescale_factors(1.0, 0.0, "per-modality") == (0.0, 1.0)
    assert opm.rescale_factors(0.0, 1.0, "per-modality") == (1.0, 0.0)


def test_opm_drop_in_one_process_is_the_composition_of_its_parts():
    """Default world_size 1: execute_drop, then feature_masks for this batch, then drop_features, from one generator."""
    g = torch.Generator().manual_seed(0)
    a, v, y = torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g), torch.arange(16)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    got = opm.opm_drop(a, v, y, 0.5, 0.3, 1.0, g1)  # both q > 0: the visual masks follow the audio ones
    assert opm.execute_drop(1.0, g2)
    keep_a, keep_v = opm.feature_masks(0.5, 0.3, 16, g2)
    want = opm.drop_features(a, v, y, keep_a, keep_v, 0.5, 0.3)
    assert got[3] and all(torch.equal(x, w) for x, w in zip(got[:3], want))
    assert got[4] == (1 - keep_a.mean().item(), 1 - keep_v.mean().item())


def test_logged_rescale_is_the_executed_drops_factor(tiny_data, tmp_path):
    """One step, drop executed (--p-exe 1): train/rescale is that step's factor 1 / (1 - (q_a + q_v) / 2)."""
    run = run_inproc("opm.py", tiny_data, tmp_path, *"--epochs 1 --max-steps 1 --warmup-epochs 0 --p-exe 1".split())
    with open(os.path.join(run, "metrics.jsonl")) as f:
        row = json.loads(f.readline())
    assert row["train/drop_exec_frac"] == 1.0 and row["train/coeff_audio"] + row["train/coeff_visual"] > 0
    theta = (row["train/coeff_audio"] + row["train/coeff_visual"]) / 2
    assert row["train/rescale"] == pytest.approx(1 / (1 - theta), rel=1e-9)
    side = "audio" if row["train/coeff_audio"] > 0 else "visual"  # the dominant side: its q, its drops
    other = "visual" if side == "audio" else "audio"
    assert row[f"train/drop_frac_{side}"] > 0 and row[f"train/drop_frac_{other}"] == 0.0
    # per-modality factors (1 / (1 - q_a), 1 / (1 - q_v)): the logged factor is the larger, the dominant side's
    run = run_inproc(
        "opm.py",
        tiny_data,
        tmp_path / "per",
        *"--epochs 1 --max-steps 1 --warmup-epochs 0 --p-exe 1 --rescale per-modality".split(),
    )
    with open(os.path.join(run, "metrics.jsonl")) as f:
        row = json.loads(f.readline())
    q = max(row["train/coeff_audio"], row["train/coeff_visual"])
    assert q > 0 and row["train/rescale"] == pytest.approx(1 / (1 - q), rel=1e-9)
    # the warm-up: no q, no drop, factor 1
    run = run_inproc(
        "opm.py",
        tiny_data,
        tmp_path / "warm",
        *"--epochs 1 --max-steps 1 --warmup-epochs 1 --p-exe 1".split(),
    )
    with open(os.path.join(run, "metrics.jsonl")) as f:
        row = json.loads(f.readline())
    assert (row["train/coeff_audio"], row["train/coeff_visual"], row["train/drop_exec_frac"]) == (0.0, 0.0, 0.0)
    assert row["train/rescale"] == 1.0 and row["train/drop_frac_audio"] == row["train/drop_frac_visual"] == 0.0


def test_logged_rescale_is_the_mean_over_the_executed_drops(tiny_data, tmp_path):
    """Two steps, both executed: train/rescale is the mean of the two steps' factors 1 / (1 - (q_a + q_v) / 2), read
    from the per-step trace (the steps' q differ, so a sum, a product or the last step's factor would not match)."""
    with trace.tracing(str(tmp_path / "trace")):
        run = run_inproc("opm.py", tiny_data, tmp_path, *"--epochs 1 --max-steps 2 --warmup-epochs 0 --p-exe 1".split())
    with open(tmp_path / "trace" / "rank0.jsonl") as f:
        steps = [json.loads(line)["step"] for line in f]
    with open(os.path.join(run, "metrics.jsonl")) as f:
        row = json.loads(f.readline())
    assert len(steps) == 2 and all(s["train/drop_exec_frac"] == 1.0 for s in steps)
    factors = [1 / (1 - (s["train/coeff_audio"] + s["train/coeff_visual"]) / 2) for s in steps]
    assert factors[0] != pytest.approx(factors[1], rel=1e-6) and min(factors) > 1
    assert row["train/rescale"] == pytest.approx(sum(factors) / 2, rel=1e-9)
