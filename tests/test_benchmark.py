"""The benchmark runs and reports what it promises (its numbers are measurements, never asserted here): the loaders
side by side (CPU ms per clip, train and test, files and cache), the stage profile, the three JPEG decoders, the STFT
left to the model and the loader workers' memory."""

import json
import subprocess
import sys

from conftest import HANG, ROOT


def test_loading_only_reports_every_table(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        "-m",
        "tools.benchmark",
        "--sizes",
        "synthetic",
        "--loading-only",
        "--clips",
        "4",
        "--loader-rounds",
        "1",
        "--work-dir",
        str(tmp_path / "work"),
        "--json",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=HANG)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())["synthetic"]["loader"]
    assert set(r["cpu"]) == {"previous", "current", "previous --cache", "current --cache"}
    assert all(v[split] > 0 for v in r["cpu"].values() for split in ("train", "test"))
    assert set(r["stages"]["current"]) == {"read", "resample", "STFT", "decode", "augment"}
    assert r["stages"]["current"]["decode"] > 0 and r["stages"]["current --cache"]["resample"] == 0
    assert set(r["decoders"]) == {"PIL", "OpenCV", "simplejpeg"} and min(r["decoders"].values()) > 0
    assert r["model_stft"] > 0 and set(r["worker_mb"]) == {"previous", "current"}
    for line in (
        "loading alone, CPU ms per clip on one core",
        "stages, ms/clip",
        "JPEG decode alone, ms per frame",
        "on the model's side",
        "loader worker peak RSS",
    ):
        assert line in proc.stdout, line
