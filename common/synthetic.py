"""The synthetic dataset: a small seeded audio-visual set in the CREMA-D on-disk layout (docs/data.md).

The scripts write it on first use (`ensure_synthetic`); `python -m preprocess.synthetic` writes one by hand.

Layout (the real CREMA-D loader reads it unchanged):
    <out>/AudioWAV/<clip_id>.wav              16-bit PCM mono
    <out>/Image-01-FPS/<clip_id>/<NNNNN>.jpg  2-3 frames, zero-padded source-frame index
    <out>/train.csv, <out>/test.csv           `<clip_id>,<EMO>` rows, CRLF, no header
    <out>/meta.json                           the generator's parameters

Modality imbalance by construction:
- audio is easy: a clean class tone (fundamental + one harmonic) under white noise;
- vision is harder: a faint square in a class colour (random place and size per frame, so crops and flips keep
  the cue) under strong pixel noise;
- a share of clips (`--uninformative-audio`, default 0.3) has noise-only audio, so the best fused accuracy needs
  a visual encoder that actually learned.

Regimes (docs/data.md, "Regimes"): `regime_params` turns the four knobs (which modality dominates, the share of
clips whose weak / dominant modality carries no cue, the noise level) into the generator's arguments, and
REGIMES names the settings the demo and the regime study use.
"""

import fcntl
import inspect
import json
import os
import shutil
import wave

import numpy as np
from PIL import Image

EMOTIONS = ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"]  # CREMA-D label names, label index = position


def class_colours(n):
    """n unit-norm RGB directions with zero mean (hues evenly spaced), so the class is in the colour, not the
    brightness."""
    hues = 2 * np.pi * np.arange(n) / n
    rgb = np.stack([np.cos(hues), np.cos(hues - 2 * np.pi / 3), np.cos(hues + 2 * np.pi / 3)], axis=1)
    return rgb / np.linalg.norm(rgb, axis=1, keepdims=True)


def write_wav(path, x, sr):
    pcm = (np.clip(x, -1, 1) * 32767).astype("<i2")
    with wave.open(path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes(pcm.tobytes())


def make_audio(rng, label, informative, n_classes, sr, seconds, snr, noise_level=1.0):
    t = np.arange(int(round(sr * seconds))) / sr
    noise = rng.normal(0.0, 0.1 * noise_level, t.shape)
    if not informative:
        return noise
    nyq = min(sr, 8000) / 2  # keep tones below the loader's Nyquist (synthetic pipeline: 8 kHz)
    f0 = 200 + (nyq * 0.6 - 200) * label / max(1, n_classes - 1)
    phase = rng.uniform(0, 2 * np.pi)
    tone = np.sin(2 * np.pi * f0 * t + phase) + 0.5 * np.sin(2 * np.pi * 1.5 * f0 * t + phase)
    return noise + 0.1 * snr * tone / 1.5


def make_frame(rng, label, colours, px, strength, informative=True, noise_level=1.0):
    """A faint square in the class colour (random place and size, 40-70% of the side) under strong pixel noise; an
    uninformative frame draws the same square with no colour (so place and size say nothing either)."""
    img = np.full((px, px, 3), 128.0)
    side = int(px * rng.uniform(0.4, 0.7))
    y0, x0 = rng.randint(0, px - side + 1, size=2)
    if informative:
        img[y0 : y0 + side, x0 : x0 + side] += 60 * strength * colours[label]
    img = img + rng.normal(0, 50 * noise_level, (px, px, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


# the cue strengths when audio / visual dominates: (audio_snr, visual_strength). Measured alone (4 epochs): the easy
# tone and the easy square are learned in 1-2 epochs; the faint square and the faint tone take the whole run.
CUES = {"audio": (1.0, 0.2), "visual": (0.3, 0.6)}
KNOBS = ("dominant", "weak_absent", "dominant_absent", "noise")
# named regimes: the four knobs of regime_params, and the set's size where it is not the default's 600/300.
# docs/data.md, "Regimes"; the demo of run_all.sh uses audio-dominant, the regime study all but default.
SIZE = dict(n_train=420, n_test=240)  # the demo's and the study's sets: the demo's 27 runs in 10 minutes on 2 cores
REGIMES = {
    "default": dict(dominant="audio", weak_absent=0.0, dominant_absent=0.3, noise=1.0),
    "audio-dominant": dict(dominant="audio", weak_absent=0.0, dominant_absent=0.0, noise=1.0, **SIZE),
    "weak-absent": dict(dominant="audio", weak_absent=0.6, dominant_absent=0.0, noise=1.0, **SIZE),
    "dominant-absent": dict(dominant="audio", weak_absent=0.0, dominant_absent=0.3, noise=1.0, **SIZE),
    "visual-dominant": dict(dominant="visual", weak_absent=0.0, dominant_absent=0.0, noise=1.0, **SIZE),
}


def regime_params(dominant="audio", weak_absent=0.0, dominant_absent=0.0, noise=1.0):
    """The generator arguments of the four knobs: which modality gets the easy cue (the other the faint one), the
    share of clips whose weak / dominant modality is noise only, and the noise level (a factor on both noise
    stds)."""
    if dominant not in CUES:
        raise ValueError(f"dominant must be one of {', '.join(CUES)}, got {dominant!r}")
    audio_snr, visual_strength = CUES[dominant]
    absent_audio, absent_visual = (
        (dominant_absent, weak_absent) if dominant == "audio" else (weak_absent, dominant_absent)
    )
    return dict(
        audio_snr=audio_snr,
        visual_strength=visual_strength,
        uninformative_audio=absent_audio,
        uninformative_visual=absent_visual,
        noise=noise,
    )


def regime_args(name):
    """All generator arguments of the named regime (the defaults, its knobs, its size)."""
    if name not in REGIMES:
        raise ValueError(f"regime must be one of {', '.join(REGIMES)}, got {name!r}")
    r = REGIMES[name]
    return {**DEFAULTS, **regime_params(**{k: r[k] for k in KNOBS}), **{k: v for k, v in r.items() if k not in KNOBS}}


def generate(
    out,
    n_train=600,
    n_test=300,
    n_classes=6,
    sample_rate=16000,
    audio_seconds=1.0,
    frame_px=40,
    min_frames=2,
    max_frames=3,
    audio_snr=1.0,
    visual_strength=0.2,
    uninformative_audio=0.3,
    seed=0,
    uninformative_visual=0.0,
    noise=1.0,
):
    """Write the dataset to `out` (deterministic: the same arguments write byte-identical files). A clip whose
    visual side is uninformative has no cue in any of its frames."""
    if not 1 <= n_classes <= len(EMOTIONS):
        raise ValueError(f"--n-classes must be between 1 and {len(EMOTIONS)} (CREMA-D label names), got {n_classes}")
    rng = np.random.RandomState(seed)
    # never mix clips, frames or cached entries of an earlier generation
    for sub in ("AudioWAV", "Image-01-FPS", "cache"):
        shutil.rmtree(os.path.join(out, sub), ignore_errors=True)
    colours = class_colours(n_classes)
    os.makedirs(os.path.join(out, "AudioWAV"), exist_ok=True)
    os.makedirs(os.path.join(out, "Image-01-FPS"), exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = np.arange(n) % n_classes
        rng.shuffle(labels)
        rows = []
        for i, label in enumerate(labels):
            clip_id = f"{(1001 if split == 'train' else 5001) + i:04d}_SYN_{EMOTIONS[label]}_XX"
            informative = rng.uniform() >= uninformative_audio
            # drawn only when used, so the sets written before this knob existed are unchanged
            informative_v = rng.uniform() >= uninformative_visual if uninformative_visual > 0 else True
            audio = make_audio(rng, label, informative, n_classes, sample_rate, audio_seconds, audio_snr, noise)
            write_wav(os.path.join(out, "AudioWAV", f"{clip_id}.wav"), audio, sample_rate)
            fdir = os.path.join(out, "Image-01-FPS", clip_id)
            os.makedirs(fdir, exist_ok=True)
            for k in range(rng.randint(min_frames, max_frames + 1)):
                make_frame(rng, label, colours, frame_px, visual_strength, informative_v, noise).save(
                    os.path.join(fdir, f"{30 * k:05d}.jpg"), quality=90
                )
            rows.append(f"{clip_id},{EMOTIONS[label]}\r\n")
        with open(os.path.join(out, f"{split}.csv"), "w", newline="") as f:
            f.writelines(rows)
    meta = dict(
        n_train=n_train,
        n_test=n_test,
        n_classes=n_classes,
        sample_rate=sample_rate,
        audio_seconds=audio_seconds,
        frame_px=frame_px,
        min_frames=min_frames,
        max_frames=max_frames,
        audio_snr=audio_snr,
        visual_strength=visual_strength,
        uninformative_audio=uninformative_audio,
        uninformative_visual=uninformative_visual,
        noise=noise,
        seed=seed,
    )
    if meta != DEFAULTS:
        meta["custom"] = True  # written by hand with other settings: the scripts use it as it is
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
    return meta


DEFAULTS = {k: p.default for k, p in inspect.signature(generate).parameters.items() if k != "out"}  # the default set


_READ_LOCKS = {}  # root -> open lock file, held (shared) for the life of the process: "this set is being read"


def ensure_synthetic(root, params=None):
    """Generate the default synthetic set on first use, or again if it was written with other generator defaults.
    With `params` (all generator arguments, e.g. common.synthetic.regime_args): that set instead, regenerated
    whenever the folder holds another one.

    Safe when several processes start together (torchrun, two run_all.sh jobs): one generates, the others wait for
    it (an exclusive lock on `<root>.lock`). Every process then holds a shared lock on `<root>.readers` for its
    lifetime, and a set is only replaced when nobody holds it: a set another run is reading is never deleted.
    The new set is written to a temporary folder and renamed into place, so nobody reads a half-written set.
    """
    os.makedirs(os.path.dirname(os.path.abspath(root)), exist_ok=True)
    with open(f"{root}.lock", "a") as gen_lock:
        fcntl.flock(gen_lock, fcntl.LOCK_EX)  # waits while another process generates; released when the block ends
        readers = _READ_LOCKS.get(root) or open(f"{root}.readers", "a")
        meta_path = os.path.join(root, "meta.json")
        meta = None
        if os.path.isfile(meta_path):
            with open(meta_path) as f:
                meta = json.load(f)
        if params is not None:
            ok = meta is not None and {k: v for k, v in meta.items() if k != "custom"} == params
        else:
            ok = meta is not None and (meta.get("custom") or meta == DEFAULTS)
        if not ok:
            if meta is not None:
                try:  # replace the set only if no other process is reading it
                    fcntl.flock(readers, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise SystemExit(
                        f"error: {root} was written with other generator settings and another run is "
                        "reading it; wait for that run to end, or pass another --data-root"
                    ) from None
                print(f"{root} was written with other generator settings; regenerating it")
            else:
                print(f"generating the synthetic dataset in {root} (first use)")
            tmp = f"{root}.tmp{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            generate(tmp, **(params or {}))
            if os.path.isdir(root):
                old = f"{root}.old{os.getpid()}"
                os.rename(root, old)
                shutil.rmtree(old)
            os.rename(tmp, root)
        fcntl.flock(readers, fcntl.LOCK_SH)  # this process reads the set from now on
        _READ_LOCKS[root] = readers
