"""run_all.sh on a tiny setting: a table row per method and valid PNG plots; the report module alone."""

import os
import subprocess

from conftest import ROOT

METHODS = ["baseline", "baseline_audio", "baseline_visual", "ogm", "opm", "arl", "dgl", "aug"]


def test_run_all_tiny(tiny_data, tmp_path):
    out = tmp_path / "runs" / "all"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", "run_all.sh", "--data-root", tiny_data, "--out", str(out), "--seeds", "0",
                           "--", "--epochs", "1", "--max-steps", "1", "--batch-size", "4"],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = (tmp_path / "runs" / "report" / "results.md").read_text()
    rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ") and "---" not in line][
        1:
    ]
    assert sorted(set(rows)) == sorted(METHODS), table
    assert "FAILED" not in table, proc.stdout
    for png in ("test_acc.png", "modalities.png", "modulation.png"):
        data = (tmp_path / "runs" / "report" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_run_all_reports_a_failing_method_and_keeps_the_others(tiny_data, tmp_path):
    out = tmp_path / "runs" / "all"
    proc = subprocess.run(
        [
            "bash",
            "run_all.sh",
            "--data-root",
            tiny_data,
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
    proc = subprocess.run(["bash", "run_all.sh", "--dataset", "cremad", "--data-root", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "cremad not found: prepare cremad first" in proc.stderr
