"""The synthetic set is generated safely when several processes start together on an empty data root: under
torchrun one process writes it and the other waits; independent processes never delete or replace a set that
another process is reading."""

import fcntl
import glob
import json
import os
import subprocess
import sys

import pytest
from conftest import HANG, ROOT

ENSURE = "import sys; from common.synthetic import ensure_synthetic; ensure_synthetic(sys.argv[1])"


def n_clips(root):
    return len(glob.glob(os.path.join(root, "AudioWAV", "*.wav")))


def test_torchrun_on_an_empty_data_root(tmp_path):
    """Both processes of a fresh torchrun run find the whole set (no clip skipped, no missing root)."""
    root = tmp_path / "data"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        os.path.join(ROOT, "ogm.py"),
        "--dataset",
        "synthetic",
        "--data-root",
        str(root),
        "--runs-dir",
        str(tmp_path / "runs"),
        "--no-progress",
        "--batch-size",
        "4",
        "--epochs",
        "1",
        "--max-steps",
        "2",
        "--eval-max-steps",
        "1",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=HANG)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert out.count("generating the synthetic dataset") == 1, out[-4000:]
    assert "skipped" not in out and "not found" not in out, out[-4000:]
    assert n_clips(root / "synthetic") == 600 + 300
    assert not glob.glob(str(root / "synthetic.tmp*")) and not glob.glob(str(root / "synthetic.old*"))


def test_independent_processes_started_together(tmp_path):
    """Two processes on an empty root: one generates, both return with the complete set."""
    root = str(tmp_path / "synthetic")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", ENSURE, root],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=HANG)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "".join(outs).count("generating the synthetic dataset") == 1, outs
    assert n_clips(root) == 900


def _stale_set(root):
    """A small set whose meta.json says it was written with other (non-custom) generator defaults."""
    from common.synthetic import DEFAULTS, generate

    generate(root, n_train=12, n_test=6)  # not ensure_synthetic: this process must not hold the readers' lock
    meta_path = os.path.join(root, "meta.json")
    with open(meta_path, "w") as f:
        json.dump(dict(DEFAULTS, n_train=599), f)
    return meta_path


def test_a_set_being_read_is_never_replaced(tmp_path):
    """A stale set that another run holds is left alone (one-line error); once that run ends it is regenerated."""
    root = str(tmp_path / "synthetic")
    meta_path = _stale_set(root)
    before = sorted(os.listdir(os.path.join(root, "AudioWAV")))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    with open(f"{root}.readers", "a") as other_run:
        fcntl.flock(other_run, fcntl.LOCK_SH)  # another run reading the set (a separate open file)
        proc = subprocess.run(
            [sys.executable, "-c", ENSURE, root], capture_output=True, text=True, cwd=ROOT, env=env, timeout=HANG
        )
        assert proc.returncode != 0
        assert "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr
        assert root in proc.stderr and "another run is reading it" in proc.stderr
        with open(meta_path) as f:
            assert json.load(f)["n_train"] == 599  # untouched
        assert sorted(os.listdir(os.path.join(root, "AudioWAV"))) == before
        gen = subprocess.run(
            [sys.executable, "-m", "preprocess.synthetic", "--out", root],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=env,
            timeout=HANG,
        )
        assert gen.returncode != 0 and "a run is reading" in gen.stderr and "Traceback" not in gen.stderr
    proc = subprocess.run(
        [sys.executable, "-c", ENSURE, root], capture_output=True, text=True, cwd=ROOT, env=env, timeout=HANG
    )
    assert proc.returncode == 0, proc.stderr
    assert "regenerating" in proc.stdout
    with open(meta_path) as f:
        assert json.load(f)["n_train"] == 600


@pytest.mark.parametrize("custom", [False, True])
def test_a_current_or_custom_set_is_used_as_it_is(tmp_path, custom):
    """No regeneration (and no waiting on readers) when the set is current or was written by hand."""
    root = str(tmp_path / "synthetic")
    meta_path = _stale_set(root)
    with open(meta_path) as f:
        meta = json.load(f)
    meta = dict(meta, custom=True) if custom else dict(meta, n_train=600)  # written by hand / the current defaults
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    with open(f"{root}.readers", "a") as other_run:
        fcntl.flock(other_run, fcntl.LOCK_SH)
        proc = subprocess.run(
            [sys.executable, "-c", ENSURE, root], capture_output=True, text=True, cwd=ROOT, env=env, timeout=HANG
        )
    assert proc.returncode == 0 and proc.stdout == "", proc.stdout + proc.stderr
    assert n_clips(root) == 18  # the small set, not regenerated
