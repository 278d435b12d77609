"""Write a small seeded audio-visual dataset in the CREMA-D on-disk layout (docs/data.md).

    python -m preprocess.synthetic --out data/synthetic            # the default small set (seconds to write)
    python -m preprocess.synthetic --out /tmp/big --audio-seconds 3 --sample-rate 22050 --frame-px 224  # real size
    python -m preprocess.synthetic --out data/regimes/visual-dominant/synthetic --regime visual-dominant
    python -m preprocess.synthetic --out /tmp/mine/synthetic --dominant visual --weak-absent 0.5 --noise 1.5

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

Regimes: `--regime NAME` (default, audio-dominant, dominant-absent, weak-absent, visual-dominant) sets the four
knobs `--dominant`, `--weak-absent`, `--dominant-absent`, `--noise`; each knob given on the command line overrides
the regime's, and `--audio-snr`, `--visual-strength`, `--uninformative-audio`, `--uninformative-visual` override what
the knobs set.
Run the scripts on such a set with `--data-root` pointing at the folder that holds `synthetic/`.
"""

import argparse
import fcntl
import os

from common import cli
from common.synthetic import (
    DEFAULTS,
    EMOTIONS,
    KNOBS,
    REGIMES,
    class_colours,
    generate,
    make_audio,
    make_frame,
    regime_args,
    regime_params,
    write_wav,
)

__all__ = ["DEFAULTS", "EMOTIONS", "REGIMES", "class_colours", "generate", "make_audio", "make_frame", "regime_args",
           "regime_params", "write_wav"]


if __name__ == "__main__":
    p = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # one-line errors
    p.add_argument("--out", default="data/synthetic", help="output folder")
    p.add_argument("--n-train", type=int, default=None, help="training clips (default: the regime's, 600 or 420)")
    p.add_argument("--n-test", type=int, default=None, help="test clips (default: the regime's, 300 or 240)")
    p.add_argument("--n-classes", type=int, default=6, help="classes (at most 6, CREMA-D label names)")
    p.add_argument("--sample-rate", type=int, default=16000, help="wav sample rate (CREMA-D files are 16 kHz)")
    p.add_argument("--audio-seconds", type=float, default=1.0, help="clip length in seconds")
    p.add_argument("--frame-px", type=int, default=40, help="frame side in pixels")
    p.add_argument("--min-frames", type=int, default=2, help="fewest frames per clip")
    p.add_argument("--max-frames", type=int, default=3, help="most frames per clip")
    p.add_argument("--regime", default="default", choices=sorted(REGIMES),
                   help="named setting of the four knobs below (docs/data.md, Regimes)")
    p.add_argument("--dominant", default=None, choices=["audio", "visual"],
                   help="which modality gets the easy cue (the other the faint one); default: the regime's")
    p.add_argument("--weak-absent", type=float, default=None,
                   help="share of clips whose weak modality is noise only; default: the regime's")
    p.add_argument("--dominant-absent", type=float, default=None,
                   help="share of clips whose dominant modality is noise only; default: the regime's")
    p.add_argument("--noise", type=float, default=None, help="factor on both modalities' noise; default: the regime's")
    p.add_argument("--audio-snr", type=float, default=None, help="audio tone strength (overrides --dominant)")
    p.add_argument("--visual-strength", type=float, default=None, help="visual pattern strength (overrides --dominant)")
    p.add_argument("--uninformative-audio", type=float, default=None,
                   help="share of clips whose audio is noise only (overrides the absent shares)")
    p.add_argument("--uninformative-visual", type=float, default=None,
                   help="share of clips whose frames carry no cue (overrides the absent shares)")
    p.add_argument("--seed", type=int, default=0, help="generator seed")
    a = p.parse_args()
    # the regime's arguments, then the knobs given on the command line, then the low-level flags given
    knobs = {k: REGIMES[a.regime][k] if getattr(a, k) is None else getattr(a, k) for k in KNOBS}
    for name in ("weak_absent", "dominant_absent"):
        cli.check(argparse.Namespace(**knobs), name, lambda x: 0 <= x <= 1, "a share in [0, 1]")
    cli.check(argparse.Namespace(**knobs), "noise", lambda x: x > 0, "positive")
    for k, v in {**regime_args(a.regime), **regime_params(**knobs)}.items():
        if getattr(a, k, None) is None:
            setattr(a, k, v)
    for name in ("n_train", "n_test", "sample_rate", "audio_seconds", "frame_px", "min_frames"):
        cli.check(a, name, lambda x: x > 0, "positive")
    cli.check(a, "n_classes", lambda x: 1 <= x <= len(EMOTIONS), f"in 1..{len(EMOTIONS)} (CREMA-D label names)")
    cli.check(a, "max_frames", lambda x: x >= a.min_frames, f">= --min-frames ({a.min_frames})")
    for name in ("uninformative_audio", "uninformative_visual"):
        cli.check(a, name, lambda x: 0 <= x <= 1, "a share in [0, 1]")
    for name in ("audio_snr", "visual_strength"):
        cli.check(a, name, lambda x: x >= 0, ">= 0")
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(f"{a.out}.readers", "a") as readers:  # the lock every run reading this set holds (common/data.py)
        try:
            fcntl.flock(readers, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"error: a run is reading {a.out}; wait for it to end, or pass another --out") from None
        meta = generate(a.out, a.n_train, a.n_test, a.n_classes, a.sample_rate, a.audio_seconds, a.frame_px,
                        a.min_frames, a.max_frames, a.audio_snr, a.visual_strength, a.uninformative_audio, a.seed,
                        a.uninformative_visual, a.noise)
    print(f"wrote {meta['n_train']} train and {meta['n_test']} test clips to {a.out}")
