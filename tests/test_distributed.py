"""Every script under torchrun with 2 CPU processes (gloo): the replicas stay identical, and at every step both
processes use the same coefficient, the one computed from the statistics summed over both processes' samples.

One torchrun launch (tests/distributed_driver.py) runs all the scripts in a single process group, each tracing its
steps (tools/trace.py: logged values, reduced statistics, a digest of the parameters).
BatchNorm keeps per-process batch statistics, so the coefficients are checked against the gathered statistics, not
against a single-process run.
"""

import contextlib
import glob
import io
import json
import math
import os
import shutil

import pytest
import torch
from conftest import read_results, run_inproc, torchrun
from distributed_driver import global_batch  # noqa: E402

import arl  # noqa: E402
import aug  # noqa: E402
import ogm  # noqa: E402
import opm  # noqa: E402
from common.data import build_datasets, make_loaders  # noqa: E402
from common.evaluate import evaluate  # noqa: E402
from common.models import AVClassifier, unimodal_logits  # noqa: E402
from preprocess import cache  # noqa: E402
from tools import trace  # noqa: E402

TINY = ["--epochs", "1", "--max-steps", "2", "--eval-max-steps", "1"]
RUNS = {
    "baseline_audio": ("baseline.py", ["--modality", "audio"]),  # the visual encoder is unused: find_unused_parameters
    # the whole test split: test_gathered_test_metrics_count_every_clip_once
    "ogm": ("ogm.py", ["--eval-max-steps", "0"]),
    "ogm_amp": ("ogm.py", ["--amp", "--channels-last"]),
    "opm": ("opm.py", ["--warmup-epochs", "0"]),
    "arl": ("arl.py", ["--warmup-epochs", "0", "--arl-coeff-timing", "current"]),
    "dgl": ("dgl.py", []),
    "dgl_two_pass": ("dgl.py", ["--dgl-impl", "two-pass"]),  # two backward passes: sync_grads instead of DDP
    "aug": ("aug.py", ["--epochs", "2", "--max-steps", "2", "--aca-check-every", "1"]),  # ACA after epoch 0
    "mmpareto": ("mmpareto.py", []),  # three gradients per step: summed over the processes before the combination
}
# --resume under torchrun: stop after epoch 0, resume ("{RUN:name}": that job's run folder), compare with 2 epochs run
# straight through (aug: the "aug" run above, which adds a classifier after epoch 0)
RESUME_RUNS = {
    "ogm_full": ("ogm.py", ["--epochs", "2"]),
    "ogm_stop": ("ogm.py", ["--epochs", "2", "--stop-after-epochs", "1"]),
    "ogm_resume": ("ogm.py", ["--epochs", "2", "--resume", "{RUN:ogm_stop}"]),
    "aug_stop": ("aug.py", ["--epochs", "2", "--aca-check-every", "1", "--stop-after-epochs", "1"]),
    "aug_resume": ("aug.py", ["--epochs", "2", "--aca-check-every", "1", "--resume", "{RUN:aug_stop}"]),
}
# --cache at frame side 0 (exact), on a copy of the data with its cache: the same steps as the "dgl" run, bitwise
CACHE_RUNS = {"dgl_cache": ("dgl.py", ["--cache", "--cache-frame-side", "0"])}


@pytest.fixture(scope="module")
def ddp(tiny_data, tmp_path_factory):
    """Launch the driver once; returns the output folder (function results, traces/<run>, runs/<run>)."""
    out = tmp_path_factory.mktemp("ddp")
    cached_root = out / "data_cached"
    shutil.copytree(tiny_data, cached_root)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        cache.main(["--dataset", "synthetic", "--data-root", str(cached_root), "--frame-side", "0", "--workers", "1"])
    runs = []
    for name, (script, extra) in {**RUNS, **RESUME_RUNS, **CACHE_RUNS}.items():
        root = str(cached_root) if "--cache" in extra else tiny_data
        argv = [
            "--dataset",
            "synthetic",
            "--data-root",
            root,
            "--runs-dir",
            str(out / "runs" / name),
            "--no-progress",
            "--batch-size",
            "4",
            *TINY,
            *extra,
        ]
        runs.append({"script": script, "argv": argv, "trace": str(out / "traces" / name)})
    with open(out / "jobs.json", "w") as f:
        json.dump({"out": str(out), "runs": runs}, f)
    torchrun("distributed_driver.py", out / "jobs.json")
    return out


def traces(out, name):
    """Per rank: a list of steps, each {"step": logged values, "params": digest, "reduces": [(local, sum), ...]} with
    the reductions made since the previous step; reductions after the last step of an epoch open the next entry."""
    per_rank = []
    for r in (0, 1):
        steps, pending = [], []
        with open(out / "traces" / name / f"rank{r}.jsonl") as f:
            for line in map(json.loads, f):
                if "reduce" in line:
                    pending.append((line["reduce"], line["sum"]))
                else:
                    steps.append({**line, "reduces": pending})
                    pending = []
        per_rank.append((steps, pending))
    return per_rank


def test_statistics_functions_match_one_process_on_the_global_batch(ddp):
    """ogm/opm scores and ARL's coefficients from two halves of a batch equal one process on the whole batch."""
    z_a, z_v, y = global_batch()
    res = [json.load(open(ddp / f"functions_rank{r}.json")) for r in (0, 1)]
    for r in res:
        assert r["ogm_scores"] == pytest.approx([s.item() for s in ogm.ogm_scores(z_a, z_v, y)], rel=1e-6)
        assert r["opm_scores"] == pytest.approx([s.item() for s in opm.opm_scores(z_a, z_v, y)], rel=1e-6)
        one = arl.arl_coefficients(z_a, z_v, 8.0)
        for k, v in r["arl"].items():
            assert v == pytest.approx(one[k].item(), rel=1e-5, abs=1e-7), k
        assert r["gathered"] == list(range(13))  # every test clip once, in order, padding removed
        assert r["synced_grad"] == [[1.5] * 3] * 2 and r["bias_grad_none"]
        assert r["reduced_floats"] == [3.0, 1.0]
    keep_a, keep_v = opm.feature_masks(0.5, 0.0, 12, torch.Generator().manual_seed(3))
    assert res[0]["opm_masks"] == [keep_a[:6].tolist(), keep_v[:6].tolist()]
    assert res[1]["opm_masks"] == [keep_a[6:].tolist(), keep_v[6:].tolist()]


@pytest.mark.parametrize("name", list(RUNS))
def test_replicas_stay_identical(ddp, name):
    (s0, _), (s1, _) = traces(ddp, name)
    n_steps = 4 if name == "aug" else 2
    assert len(s0) == len(s1) == n_steps
    digests = [s["params"] for s in s0]
    assert digests == [s["params"] for s in s1]  # identical parameters after every step
    assert len(set(digests)) == n_steps  # and they did train
    for a, b in zip(s0, s1):
        for key in (
            "train/coeff_audio",
            "train/coeff_visual",
            "train/drop_exec_frac",
            "train/clip_factor",
            "train/grad_norm_audio",
            "train/grad_norm_head",
        ):
            if key in a["step"]:
                assert a["step"][key] == b["step"][key], key
    assert any(a["step"]["train/loss"] != b["step"]["train/loss"] for a, b in zip(s0, s1))  # different shards
    assert len(glob.glob(str(ddp / "runs" / name / "*"))) == 1  # one run folder: only rank 0 writes
    r = read_results(glob.glob(str(ddp / "runs" / name / "*"))[0])
    assert r["epochs_run"] == (2 if name == "aug" else 1) and math.isfinite(r["last"]["train/loss"])


def arl_c_audio(sums, n_classes, temperature=8.0, floor=0.3):
    """c_a of docs/arl.md from the summed statistics (|z_a| per class, |z_v| per class, entropy sums, count)."""
    s = torch.tensor(sums, dtype=torch.float64)
    n, c = s[-1], n_classes
    dep_a, dep_v = (s[:c] / n).sum(), (s[c : 2 * c] / n).sum()
    ent_a, ent_v = s[2 * c] / n, s[2 * c + 1] / n
    h_a, h_v = max(ent_a / (ent_a + ent_v), floor), max(ent_v / (ent_a + ent_v), floor)
    w_a = (1 / h_a) / (1 / h_a + 1 / h_v)
    return torch.sigmoid(temperature * (w_a - dep_a / (dep_a + dep_v))).item()


def test_arl_formula_of_the_sums_is_the_script_function():
    """The test's own reading of the summed statistics (used below) agrees with arl.arl_coefficients."""
    z_a, z_v, _ = global_batch()
    p_a, p_v = torch.softmax(z_a, 1), torch.softmax(z_v, 1)
    ent = lambda p: -(p * torch.log(p + 1e-16)).sum()  # noqa: E731
    sums = [*z_a.abs().sum(0).tolist(), *z_v.abs().sum(0).tolist(), ent(p_a).item(), ent(p_v).item(), 12.0]
    assert arl_c_audio(sums, 5) == pytest.approx(arl.arl_coefficients(z_a, z_v, 8.0)["c_a"].item(), rel=1e-5)


@pytest.mark.parametrize("name", ["ogm", "ogm_amp", "opm", "arl"])
def test_each_step_uses_the_coefficient_of_the_summed_statistics(ddp, name):
    (s0, _), (s1, _) = traces(ddp, name)
    differ = False
    for a, b in zip(s0, s1):
        (loc0, sum0), (loc1, sum1) = a["reduces"][-1], b["reduces"][-1]  # the step's statistics, before and after
        assert sum0 == sum1 == pytest.approx([x + y for x, y in zip(loc0, loc1)], rel=1e-6)
        differ |= loc0 != loc1
        if name.startswith("ogm"):
            expected = ogm.ogm_coefficients(sum0[0], sum0[1], 0.8)[:2]  # synthetic cvpr preset: alpha 0.8, epoch 0
        elif name == "opm":
            expected = opm.drop_probabilities(sum0[0], sum0[1], 0.5, 0.5)
        else:  # ARL, --arl-coeff-timing current: the step's own coefficients, as multipliers 1 + c
            c_a = arl_c_audio(sum0, (len(sum0) - 3) // 2)
            expected = (1 + c_a, 2 - c_a)
        for step in (a, b):
            got = (step["step"]["train/coeff_audio"], step["step"]["train/coeff_visual"])
            assert got == pytest.approx(expected, rel=1e-5)
    assert differ  # the two processes had different samples


def test_mmpareto_combines_the_global_batch_gradients(ddp):
    """mmpareto.py: at every step both processes sum their batch-size-weighted gradients of the three losses (one
    reduction of every parameter's three gradients) before the combination, so the weights and the rescale are
    those of the global batch on both (equality with one process on the whole batch, where BatchNorm does not
    differ: tests/test_mmpareto.py test_ddp_two_processes_apply_the_global_batch_update)."""
    (s0, _), (s1, _) = traces(ddp, "mmpareto")
    for a, b in zip(s0, s1):
        (n0, nsum0), (g0, gsum0) = a["reduces"][-2:]
        (n1, nsum1), (g1, gsum1) = b["reduces"][-2:]
        assert n0 == n1 == [2.0] and nsum0 == nsum1 == [4.0]  # the global batch: 2 + 2 samples
        assert gsum0 == gsum1 and gsum0[0] == pytest.approx(g0[0] + g1[0], rel=1e-5, abs=1e-8)
        assert g0 != g1  # the shards' gradients differed
        for key in ("train/coeff_audio", "train/coeff_visual", "train/cos_audio", "train/cos_visual"):
            assert a["step"][key] == b["step"][key], key


def test_aug_classifier_assignment_uses_the_summed_confidence(ddp):
    for steps, _ in traces(ddp, "aug"):
        epoch1 = steps[2]
        # after epoch 0's evaluation: the summed [S_a, S_v, samples] (the epoch's replaced-clip count is a 1-list)
        s = [s for _, s in epoch1["reduces"] if len(s) == 3][-1]
        n = s[2]
        assert n == 8  # 2 steps x global batch 4
        action = aug.aca_decision(s[0] / n, s[1] / n, 1.0, 0.01)
        for step in steps[2:]:
            assert step["step"]["train/coeff_audio"] == 1 + (action == -1)
            assert step["step"]["train/coeff_visual"] == 1 + (action == 1)


def test_gathered_test_metrics_count_every_clip_once(ddp, tiny_data):
    """The metrics the 2-process run logged equal one process evaluating its checkpoint on the whole test split."""
    run = glob.glob(str(ddp / "runs" / "ogm" / "*"))[0]
    logged = read_results(run)["last"]
    args = ogm.parse_args(["--dataset", "synthetic", "--data-root", tiny_data, "--batch-size", "4"])
    _, test_set, classes = build_datasets(args)
    _, loader = make_loaders(test_set, test_set, args, torch.Generator())
    model = AVClassifier(len(classes), "concat", test_set.frontend)
    model.load_state_dict(torch.load(os.path.join(run, "last.pt"), weights_only=False)["model"])
    model.eval()

    def logits_fn(audio, visual):
        f_a, f_v, z = model(audio, visual)
        return (z, *unimodal_logits(model.head, f_a, f_v, bias="half"))

    single = evaluate(logits_fn, loader, "cpu", len(classes))
    for key in ("test/acc", "test/acc_audio", "test/acc_visual", "test/macro_f1"):
        assert logged[key] == single[key], key
    assert logged["test/map"] == pytest.approx(single["test/map"], abs=1e-6)
    assert read_results(run)["args"]["batch_size"] == 4 and len(test_set) == 12


@pytest.mark.parametrize(
    "full, stopped, resumed", [("ogm_full", "ogm_stop", "ogm_resume"), ("aug", "aug_stop", "aug_resume")]
)
def test_resume_under_torchrun_continues_exactly(ddp, full, stopped, resumed):
    """Stopping after epoch 0 and resuming with 2 processes gives the checkpoint of the uninterrupted run, bitwise:
    the shards, augmentation streams, GE noise stream (ogm) and added classifiers (aug) all continue exactly."""
    (run_full,), (run_resumed,) = (
        glob.glob(str(ddp / "runs" / full / "*")),
        glob.glob(str(ddp / "runs" / stopped / "*")),
    )
    assert not os.path.exists(ddp / "runs" / resumed)  # --resume continues in the stopped run's folder
    a = torch.load(os.path.join(run_full, "last.pt"), weights_only=False)
    b = torch.load(os.path.join(run_resumed, "last.pt"), weights_only=False)
    assert a["epoch"] == b["epoch"] == 1 and len(b["history"]) == 2
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    opt_a, opt_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert opt_a.keys() == opt_b.keys()
    for i in opt_a:
        for k, v in opt_a[i].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(opt_b[i][k])), (i, k)
    drop_timing = lambda h: {k: v for k, v in h.items() if not k.startswith("charts/")}  # noqa: E731
    assert [drop_timing(h) for h in a["history"]] == [drop_timing(h) for h in b["history"]]
    for key in ("noise_rng", "added"):  # ogm: the GE noise stream; aug: the classifiers ACA added
        if key in a:
            assert torch.equal(a[key], b[key]) if key == "noise_rng" else a[key] == b[key], key
    for r in (0, 1):  # the resumed process's steps are the full run's epoch-1 steps, on both ranks
        (steps_full, _), (steps_resumed, _) = traces(ddp, full)[r], traces(ddp, resumed)[r]
        assert len(steps_resumed) == 2
        assert [s["params"] for s in steps_full[-2:]] == [s["params"] for s in steps_resumed]


@pytest.mark.parametrize("script", ["baseline.py", "ogm.py", "opm.py", "arl.py", "dgl.py", "aug.py", "mmpareto.py"])
def test_amp_and_channels_last_run_on_cpu(script, tiny_data, tmp_path):
    """Every script's training forward runs under bfloat16 autocast with --amp (the loss moves by bf16 rounding, and
    stays float32 and close), and --channels-last stores the encoders' conv kernels channels-last."""
    extra = ["--warmup-epochs", "0"] if script in ("opm.py", "arl.py") else []
    first_loss, runs = {}, {}
    for name, flags in (("fp32", []), ("amp", ["--amp", "--channels-last"])):
        with trace.tracing(str(tmp_path / "trace" / name)):
            runs[name] = run_inproc(
                script,
                tiny_data,
                tmp_path / name,
                *"--epochs 1 --max-steps 1 --eval-max-steps 1".split(),
                *extra,
                *flags,
            )
        with open(tmp_path / "trace" / name / "rank0.jsonl") as f:
            first_loss[name] = next(r for r in map(json.loads, f) if "step" in r)["step"]["train/loss"]
    assert first_loss["amp"] != first_loss["fp32"]  # the forward pass did run in bfloat16
    assert first_loss["amp"] == pytest.approx(first_loss["fp32"], rel=0.05)
    assert read_results(runs["amp"])["args"]["amp"] is True
    for name, channels_last in (("fp32", False), ("amp", True)):
        state = torch.load(os.path.join(runs[name], "last.pt"), weights_only=False)["model"]
        kernels = [v for k, v in state.items() if k.startswith(("audio_net", "visual_net")) and v.dim() == 4]
        assert kernels and all(k.dtype == torch.float32 for k in kernels)
        assert all(
            k.is_contiguous(memory_format=torch.channels_last) == channels_last
            for k in kernels
            if k.shape[1] > 1 and k.shape[-1] > 1
        )  # else both layouts count as contiguous


def test_cached_data_under_torchrun_gives_the_same_steps(ddp):
    """--cache (frame side 0, exact) under torchrun: both processes take exactly the steps of the uncached run."""
    for r in (0, 1):
        (plain, _), (cached, _) = traces(ddp, "dgl")[r], traces(ddp, "dgl_cache")[r]
        assert len(plain) == len(cached) == 2
        assert [s["params"] for s in plain] == [s["params"] for s in cached]
        assert [s["step"]["train/loss"] for s in plain] == [s["step"]["train/loss"] for s in cached]
    run = glob.glob(str(ddp / "runs" / "dgl_cache" / "*"))[0]
    assert read_results(run)["args"]["cache"] is True
