"""Shared fixtures: a tiny synthetic dataset (CREMA-D layout), and helpers that run a script in a subprocess or in
this process."""

import glob
import json
import os
import runpy
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from preprocess.synthetic import generate  # noqa: E402


@pytest.fixture(autouse=True)
def _free_disk(request):
    """Delete each test's tmp_path when it ends: every run writes ~0.2 GB checkpoints (two ResNet18s + momentum)."""
    yield
    path = request.node.funcargs.get("tmp_path")
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _free_disk_at_the_end(tmp_path_factory):
    """Delete this session's temporary folder when the suite ends: module-scoped fixtures (e.g. the torchrun runs of
    test_distributed.py) keep their checkpoints until then, several GB per suite run otherwise left in /tmp."""
    yield
    shutil.rmtree(tmp_path_factory.getbasetemp(), ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A --data-root holding synthetic/ with 24 train and 12 test clips (seconds to write)."""
    root = tmp_path_factory.mktemp("data")
    generate(str(root / "synthetic"), n_train=24, n_test=12)
    return str(root)


def run_script(script, data_root, runs_dir, *extra, check=True):
    """Run `python <script> --dataset synthetic ...` tiny; return (completed process, run folder or None)."""
    cmd = [sys.executable, os.path.join(ROOT, script), "--dataset", "synthetic", "--data-root", str(data_root),
           "--runs-dir", str(runs_dir), "--no-progress", "--batch-size", "4", *map(str, extra)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    runs = sorted(glob.glob(os.path.join(str(runs_dir), "*")), key=os.path.getmtime)
    return proc, (runs[-1] if runs else None)


def run_inproc(script, data_root, runs_dir, *extra):
    """`python <script> --dataset synthetic ... --batch-size 4 <extra>` in this process with runpy (the same code path,
    without an interpreter start-up); returns the newest run folder. A non-zero exit is raised."""
    argv = [script, "--dataset", "synthetic", "--data-root", str(data_root), "--runs-dir", str(runs_dir), "--no-progress",
            "--batch-size", "4", *map(str, extra)]
    old, sys.argv = sys.argv, argv
    try:
        runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    except SystemExit as e:  # --stop-after-epochs and --eval-only exit with 0
        if e.code not in (0, None):
            raise
    finally:
        sys.argv = old
    return sorted(glob.glob(os.path.join(str(runs_dir), "*")), key=os.path.getmtime)[-1]


def read_results(run_dir):
    with open(os.path.join(run_dir, "results.json")) as f:
        return json.load(f)
