"""The synthetic generator's regime knobs (which modality dominates, the share of clips whose weak or dominant
modality has no cue, the noise level), the named regimes, and ensure_synthetic with a regime's arguments."""

import glob
import json
import os
import subprocess
import sys
import wave

import numpy as np
import pytest
from conftest import ROOT
from PIL import Image

from common.data import ensure_synthetic
from common.synthetic import CUES, DEFAULTS, EMOTIONS, REGIMES, generate, regime_args, regime_params


def frames_by_clip(root):
    """clip id -> list of (H, W, 3) float arrays of its frames."""
    out = {}
    for d in sorted(glob.glob(os.path.join(root, "Image-01-FPS", "*"))):
        out[os.path.basename(d)] = [np.asarray(Image.open(f), dtype=np.float64) for f in sorted(glob.glob(d + "/*"))]
    return out


def wav(root, clip_id):
    with wave.open(os.path.join(root, "AudioWAV", clip_id + ".wav")) as w:
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2") / 32767


def test_default_regime_is_the_default_set():
    assert regime_args("default") == DEFAULTS
    with pytest.raises(ValueError, match="regime must be one of"):
        regime_args("nope")


def test_dominant_picks_the_cues_and_the_absent_shares_follow_it():
    a = regime_params("audio", weak_absent=0.4, dominant_absent=0.1, noise=2.0)
    assert (a["audio_snr"], a["visual_strength"]) == CUES["audio"]
    assert (a["uninformative_audio"], a["uninformative_visual"], a["noise"]) == (0.1, 0.4, 2.0)
    v = regime_params("visual", weak_absent=0.4, dominant_absent=0.1)
    assert (v["audio_snr"], v["visual_strength"]) == CUES["visual"]
    assert (v["uninformative_audio"], v["uninformative_visual"], v["noise"]) == (0.4, 0.1, 1.0)
    # the easy cue of each side is stronger than its faint one
    assert CUES["audio"][0] > CUES["visual"][0] and CUES["visual"][1] > CUES["audio"][1]
    with pytest.raises(ValueError, match="dominant must be"):
        regime_params("text")


def test_the_study_regimes():
    ad, da, wa, vd = (regime_args(n) for n in ("audio-dominant", "dominant-absent", "weak-absent", "visual-dominant"))
    assert (ad["uninformative_audio"], ad["uninformative_visual"]) == (0.0, 0.0)
    assert (da["uninformative_audio"], da["uninformative_visual"]) == (0.3, 0.0)  # the default's knobs, smaller
    assert (wa["uninformative_audio"], wa["uninformative_visual"]) == (0.0, 0.6) and wa["audio_snr"] == 1.0
    assert (vd["audio_snr"], vd["visual_strength"]) == CUES["visual"]
    assert all(r["n_train"] == 420 and r["n_test"] == 240 for r in (ad, da, wa, vd))
    assert set(REGIMES) == {"default", "audio-dominant", "dominant-absent", "weak-absent", "visual-dominant"}


def test_uninformative_visual_clips_have_no_cue_in_any_frame(tmp_path):
    """With almost no noise: a clip with the cue has a coloured square (far from grey 128 somewhere); a clip without
    it is flat grey in every frame. The share of cue-less clips follows uninformative_visual."""
    root = str(tmp_path / "s")
    generate(root, n_train=60, n_test=6, frame_px=24, visual_strength=1.0, uninformative_visual=0.5, noise=1e-3)
    frames = frames_by_clip(root)
    flat = {c: all(np.abs(f - 128).max() <= 2 for f in fs) for c, fs in frames.items()}
    coloured = {c: all(np.abs(f - 128).max() >= 20 for f in fs) for c, fs in frames.items()}
    assert all(flat[c] != coloured[c] for c in frames)  # each clip is one or the other, in all its frames
    train_flat = sum(flat[c] for c in frames if int(c[:4]) < 5001)
    assert 18 <= train_flat <= 42  # 60 clips at 0.5: binomial sd 3.9
    generate(root, n_train=12, n_test=6, frame_px=24, visual_strength=1.0, uninformative_visual=0.0, noise=1e-3)
    assert not any(all(np.abs(f - 128).max() <= 2 for f in fs) for fs in frames_by_clip(root).values())
    generate(root, n_train=12, n_test=6, frame_px=24, visual_strength=1.0, uninformative_visual=1.0, noise=1e-3)
    assert all(all(np.abs(f - 128).max() <= 2 for f in fs) for fs in frames_by_clip(root).values())
    with open(os.path.join(root, "meta.json")) as f:
        assert json.load(f)["uninformative_visual"] == 1.0


def test_noise_scales_both_modalities(tmp_path):
    """Noise-only audio has std 0.1 * noise; cue-less frames have pixel std close to 50 * noise (JPEG smooths a
    a lot: about 35 at 32 px), so halving the noise halves both."""
    stds = {}
    for noise in (1.0, 0.5):
        root = str(tmp_path / f"n{noise}")
        generate(root, n_train=6, n_test=6, frame_px=32, uninformative_audio=1.0, uninformative_visual=1.0, noise=noise)
        clips = [os.path.basename(p)[:-4] for p in glob.glob(os.path.join(root, "AudioWAV", "*.wav"))]
        a = np.concatenate([wav(root, c) for c in clips]).std()
        v = np.mean([f.std() for fs in frames_by_clip(root).values() for f in fs])
        stds[noise] = (a, v)
    assert stds[1.0][0] == pytest.approx(0.1, rel=0.02) and stds[0.5][0] == pytest.approx(0.05, rel=0.02)
    assert 30 < stds[1.0][1] < 52 and stds[0.5][1] / stds[1.0][1] == pytest.approx(0.5, abs=0.06)


def test_cli_regime_then_knobs_then_low_level_flags(tmp_path):
    out = tmp_path / "r" / "synthetic"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "preprocess.synthetic",
            "--out",
            str(out),
            "--regime",
            "weak-absent",
            "--weak-absent",
            "0.2",
            "--uninformative-audio",
            "0.1",
            "--n-train",
            "6",
            "--n-test",
            "6",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    with open(out / "meta.json") as f:
        meta = json.load(f)
    assert (meta["uninformative_visual"], meta["uninformative_audio"], meta["n_train"]) == (0.2, 0.1, 6)
    assert (meta["audio_snr"], meta["visual_strength"], meta["custom"]) == (*CUES["audio"], True)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "preprocess.synthetic",
            "--out",
            str(out),
            "--regime",
            "visual-dominant",
            "--n-train",
            "6",
            "--n-test",
            "6",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    with open(out / "meta.json") as f:
        meta = json.load(f)
    assert (meta["audio_snr"], meta["visual_strength"]) == CUES["visual"]
    for flag, value in (("--weak-absent", "1.5"), ("--noise", "0"), ("--dominant-absent", "-0.1")):
        proc = subprocess.run(
            [sys.executable, "-m", "preprocess.synthetic", "--out", str(out), flag, value],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 2 and proc.stderr.strip().startswith(f"synthetic.py: error: {flag} must be")


def test_ensure_synthetic_writes_the_regime_and_rewrites_it_when_it_differs(tmp_path):
    root = str(tmp_path / "regimes" / "x" / "synthetic")
    small = dict(regime_args("weak-absent"), n_train=len(EMOTIONS), n_test=len(EMOTIONS))
    ensure_synthetic(root, small)
    with open(os.path.join(root, "meta.json")) as f:
        meta = json.load(f)
    assert {k: v for k, v in meta.items() if k != "custom"} == small
    stamp = os.path.getmtime(os.path.join(root, "meta.json"))
    ensure_synthetic(root, small)  # the same set: kept
    assert os.path.getmtime(os.path.join(root, "meta.json")) == stamp
    other = dict(small, uninformative_visual=0.0)
    ensure_synthetic(root, other)  # another set: written again (this process holds only a shared lock)
    with open(os.path.join(root, "meta.json")) as f:
        assert json.load(f)["uninformative_visual"] == 0.0
