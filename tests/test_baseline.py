"""baseline.py end to end: smoke runs (joint and unimodal), run folder contents, resume equivalence, eval-only."""

import json
import os

import pytest
import torch
from conftest import read_results, run_script

TINY = ("--epochs", "2", "--max-steps", "2")


def test_joint_smoke_and_run_folder(tiny_data, tmp_path):
    proc, run = run_script("baseline.py", tiny_data, tmp_path, *TINY)
    assert os.path.basename(run).startswith("synthetic__baseline__0__")
    r = read_results(run)
    for key in (
        "test/acc",
        "test/acc_audio",
        "test/acc_visual",
        "test/macro_f1",
        "test/map",
        "train/loss",
        "train/loss_audio",
        "train/loss_visual",
        "train/ratio",
        "charts/lr",
        "charts/samples_per_sec",
    ):
        assert key in r["last"] and key in r["best"], key
    assert r["epochs_run"] == 2 and r["wall_time_sec"] > 0 and r["args"]["fusion"] == "concat"
    lines = open(os.path.join(run, "metrics.jsonl")).read().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(run))
    assert r["best"]["test/acc"] == max(json.loads(line)["test/acc"] for line in lines)


# README "What a run writes": last.pt 179 MB (the weights of the two ResNet18s and the fusion head, 90 MB, and SGD's
# momentum, as much again), best.pt 90 MB (--save-best: weights only), the logs a few kB. The model's size does not
# depend on the input size, so the tiny run's checkpoints have the real ones' size.
MB = 1e6


def sizes(run):
    return {
        f if not f.startswith("events.out.tfevents") else "events": os.path.getsize(os.path.join(run, f))
        for f in os.listdir(run)
    }


def test_a_run_writes_one_resumable_checkpoint_of_the_documented_size(tiny_data, tmp_path):
    _, run = run_script("baseline.py", tiny_data, tmp_path, *TINY)
    written = sizes(run)
    assert set(written) == {"args.json", "metrics.jsonl", "events", "results.json", "last.pt"}
    assert written["last.pt"] == pytest.approx(179 * MB, abs=0.5 * MB)
    assert sum(v for k, v in written.items() if k != "last.pt") < 0.1 * MB
    last = torch.load(os.path.join(run, "last.pt"), weights_only=False)
    assert {"model", "optimizer", "scheduler", "rng", "history", "best", "args"} <= set(last)


def test_save_best_keeps_the_best_weights_only_and_no_save_writes_no_checkpoint(tiny_data, tmp_path):
    _, run = run_script("baseline.py", tiny_data, tmp_path / "best", *TINY, "--save-best")
    written = sizes(run)
    assert written["best.pt"] == pytest.approx(90 * MB, abs=0.5 * MB)
    best = torch.load(os.path.join(run, "best.pt"), weights_only=False)
    assert "optimizer" not in best and "scheduler" not in best and "rng" not in best
    assert best["epoch"] == read_results(run)["best"]["epoch"]
    _, run = run_script("baseline.py", tiny_data, tmp_path / "none", *TINY, "--no-save")
    assert not [f for f in os.listdir(run) if f.endswith(".pt")]
    assert read_results(run)["epochs_run"] == 2


@pytest.mark.parametrize("modality,absent", [("audio", "test/acc_visual"), ("visual", "test/acc_audio")])
def test_unimodal_baselines(tiny_data, tmp_path, modality, absent):
    _, run = run_script("baseline.py", tiny_data, tmp_path, *"--epochs 1 --max-steps 2 --modality".split(), modality)
    r = read_results(run)
    assert absent not in r["last"] and r["last"][f"test/acc_{modality}"] == r["last"]["test/acc"]


@pytest.mark.parametrize("fusion", ["sum", "film", "gated"])
def test_other_fusions(tiny_data, tmp_path, fusion):
    _, run = run_script("baseline.py", tiny_data, tmp_path, *"--epochs 1 --max-steps 1 --fusion".split(), fusion)
    assert read_results(run)["args"]["fusion"] == fusion


def test_resume_reaches_the_same_numbers(tiny_data, tmp_path):
    _, straight = run_script("baseline.py", tiny_data, tmp_path / "a", *"--epochs 3 --max-steps 2".split())
    _, cut = run_script(
        "baseline.py", tiny_data, tmp_path / "b", *"--epochs 3 --max-steps 2 --stop-after-epochs 1".split()
    )
    assert not os.path.exists(os.path.join(cut, "results.json"))
    assert torch.load(os.path.join(cut, "last.pt"), weights_only=False)["epoch"] == 0
    run_script("baseline.py", tiny_data, tmp_path / "b", "--resume", cut)
    a, b = read_results(straight), read_results(cut)
    strip = lambda h: {k: v for k, v in h.items() if not k.startswith("charts/")}  # noqa: E731 (timings differ)
    assert strip(a["last"]) == strip(b["last"])
    assert strip(a["best"]) == strip(b["best"])
    sa = torch.load(os.path.join(straight, "last.pt"), weights_only=False)["model"]
    sb = torch.load(os.path.join(cut, "last.pt"), weights_only=False)["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    epochs = [json.loads(line)["epoch"] for line in open(os.path.join(cut, "metrics.jsonl"))]
    assert epochs == [0, 1, 2]


def test_eval_only(tiny_data, tmp_path):
    _, run = run_script("baseline.py", tiny_data, tmp_path, *"--epochs 1 --max-steps 2 --save-best".split())
    best = read_results(run)["best"]
    proc, _ = run_script(
        "baseline.py", tiny_data, tmp_path, "--eval-only", "--checkpoint", os.path.join(run, "best.pt")
    )
    assert f"acc={best['test/acc']:.4f}" in proc.stdout


def test_missing_checkpoint_is_a_clear_error(tiny_data, tmp_path):
    proc, _ = run_script(
        "baseline.py", tiny_data, tmp_path, "--eval-only", "--checkpoint", str(tmp_path / "nope.pt"), check=False
    )
    assert proc.returncode != 0 and "nope.pt not found" in proc.stderr
