"""run_all.sh on a tiny setting: a table row per method and valid PNG plots; the report module alone."""

import glob
import json
import os
import subprocess

from conftest import ROOT

from common.synthetic import regime_args

METHODS = ["baseline", "baseline_audio", "baseline_visual", "ogm", "opm", "arl", "dgl", "aug", "mmpareto", "inforeg"]


def test_run_all_tiny(tiny_data, tmp_path):
    out = tmp_path / "runs" / "all"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [
            "bash",
            "run_all.sh",
            "--data-root",
            tiny_data,
            "--regime",
            "none",
            "--out",
            str(out),
            "--seeds",
            "0",
            "--",
            "--epochs",
            "1",
            "--max-steps",
            "1",
            "--batch-size",
            "4",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = (tmp_path / "runs" / "report" / "results.md").read_text()
    rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ") and "---" not in line][
        1:
    ]
    assert sorted(set(rows)) == sorted(METHODS), table
    assert "FAILED" not in table, proc.stdout
    for png in ("test_acc.png", "branches.png", "modalities.png", "modulation.png"):
        data = (tmp_path / "runs" / "report" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert not glob.glob(str(out / "**" / "*.pt"), recursive=True)  # no checkpoint unless --checkpoints


def test_quick_ends_with_the_imbalance_line_and_checkpoints_only_when_asked(tiny_data, tmp_path):
    """`run_all.sh --quick` (README's first command) runs joint training and the visual encoder alone and ends with
    the line comparing them; here at test size (tiny data, 1 epoch), where the numbers mean nothing."""
    cmd = ["bash", "run_all.sh", "--quick", "--data-root", tiny_data, "--regime", "none", "--out", str(tmp_path / "q")]
    tiny = ["--", "--epochs", "1", "--max-steps", "1", "--batch-size", "4"]
    proc = subprocess.run(
        cmd + tiny, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("Imbalance: joint training's visual branch against the visual encoder trained alone"), last
    done = sorted(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("done"))
    assert done == ["baseline", "baseline_visual"] and "seeds 0," in proc.stdout
    assert not glob.glob(str(tmp_path / "q" / "**" / "*.pt"), recursive=True)
    proc = subprocess.run(
        cmd + ["--checkpoints", "--methods", "baseline"] + tiny,
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(glob.glob(str(tmp_path / "q" / "**" / "last.pt"), recursive=True)) == 1


def test_run_all_reports_a_failing_method_and_keeps_the_others(tiny_data, tmp_path):
    out = tmp_path / "runs" / "all"
    proc = subprocess.run(
        [
            "bash",
            "run_all.sh",
            "--data-root",
            tiny_data,
            "--regime",
            "none",
            "--out",
            str(out),
            "--methods",
            "baseline,ogm",
            "--",
            "--epochs",
            "1",
            "--max-steps",
            "1",
            "--batch-size",
            "4",
            "--lr",
            "-1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 0
    table = (tmp_path / "runs" / "report" / "results.md").read_text()
    assert "| baseline | FAILED" in table and "| ogm | FAILED" in table


def test_run_all_unprepared_dataset(tmp_path):
    proc = subprocess.run(
        ["bash", "run_all.sh", "--dataset", "cremad", "--data-root", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1 and "cremad not found: prepare cremad first" in proc.stderr


def test_run_all_study_regimes_tiny(tmp_path):
    """--study regimes: each of the four regimes written under --data-root/regimes/, its runs under --out/<regime>,
    a report per regime and study.md with one table per regime (aug_trained = aug.py --train-new-heads)."""
    out = tmp_path / "study"
    proc = subprocess.run(
        [
            "bash",
            "run_all.sh",
            "--study",
            "regimes",
            "--data-root",
            str(tmp_path / "data"),
            "--out",
            str(out),
            "--seeds",
            "0",
            "--methods",
            "baseline_visual,aug_trained",
            "--",
            "--epochs",
            "1",
            "--max-steps",
            "1",
            "--eval-max-steps",
            "1",
            "--batch-size",
            "4",
        ],
        cwd=ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    regimes = ["audio-dominant", "dominant-absent", "weak-absent", "visual-dominant"]
    for regime in regimes:
        with open(tmp_path / "data" / "regimes" / regime / "synthetic" / "meta.json") as f:
            meta = json.load(f)
        assert {k: v for k, v in meta.items() if k != "custom"} == regime_args(regime)
        args = [json.load(open(p)) for p in glob.glob(str(out / regime / "aug_trained" / "*" / "args.json"))]
        assert len(args) == 1 and args[0]["train_new_heads"] is True and args[0]["exp_name"] == "aug_trained"
        assert (out / "report" / regime / "results.md").is_file()
    study = (out / "report" / "study.md").read_text()
    assert [line[4:] for line in study.splitlines() if line.startswith("### ")] == regimes
    assert study.count("| aug_trained | 0 |") == 4 and study.count("| baseline_visual | 0 |") == 4
    assert "FAILED" not in study
    assert (out / "report" / "weak_branch.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_all_refuses_an_unknown_study_or_regime(tmp_path):
    for flags, msg in (
        (["--study", "seeds"], "--study must be regimes"),
        (["--regime", "loud"], "--regime must be"),
        (["--study", "regimes", "--dataset", "cremad"], "runs on the synthetic regimes"),
    ):
        proc = subprocess.run(
            ["bash", "run_all.sh", "--data-root", str(tmp_path), *flags], cwd=ROOT, capture_output=True, text=True
        )
        assert proc.returncode == 2 and msg in proc.stderr, proc.stderr
