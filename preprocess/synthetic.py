"""Write a small seeded audio-visual dataset in the CREMA-D on-disk layout (docs/data.md).

    python -m preprocess.synthetic --out data/synthetic            # the default small set (seconds to write)
    python -m preprocess.synthetic --out /tmp/big --audio-seconds 3 --sample-rate 22050 --frame-px 224  # real size

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
"""

import argparse
import fcntl
import os

from common import cli
from common.synthetic import DEFAULTS, EMOTIONS, class_colours, generate, make_audio, make_frame, write_wav

__all__ = ["DEFAULTS", "EMOTIONS", "class_colours", "generate", "make_audio", "make_frame", "write_wav"]


if __name__ == "__main__":
    p = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # one-line errors
    p.add_argument("--out", default="data/synthetic", help="output folder")
    p.add_argument("--n-train", type=int, default=600, help="training clips")
    p.add_argument("--n-test", type=int, default=300, help="test clips")
    p.add_argument("--n-classes", type=int, default=6, help="classes (at most 6, CREMA-D label names)")
    p.add_argument("--sample-rate", type=int, default=16000, help="wav sample rate (CREMA-D files are 16 kHz)")
    p.add_argument("--audio-seconds", type=float, default=1.0, help="clip length in seconds")
    p.add_argument("--frame-px", type=int, default=40, help="frame side in pixels")
    p.add_argument("--min-frames", type=int, default=2, help="fewest frames per clip")
    p.add_argument("--max-frames", type=int, default=3, help="most frames per clip")
    p.add_argument("--audio-snr", type=float, default=1.0, help="audio tone strength relative to the noise")
    p.add_argument("--visual-strength", type=float, default=0.2, help="visual pattern strength relative to the noise")
    p.add_argument("--uninformative-audio", type=float, default=0.3, help="share of clips whose audio is noise only")
    p.add_argument("--seed", type=int, default=0, help="generator seed")
    a = p.parse_args()
    for name in ("n_train", "n_test", "sample_rate", "audio_seconds", "frame_px", "min_frames"):
        cli.check(a, name, lambda x: x > 0, "positive")
    cli.check(a, "n_classes", lambda x: 1 <= x <= len(EMOTIONS), f"in 1..{len(EMOTIONS)} (CREMA-D label names)")
    cli.check(a, "max_frames", lambda x: x >= a.min_frames, f">= --min-frames ({a.min_frames})")
    cli.check(a, "uninformative_audio", lambda x: 0 <= x <= 1, "a share in [0, 1]")
    for name in ("audio_snr", "visual_strength"):
        cli.check(a, name, lambda x: x >= 0, ">= 0")
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(f"{a.out}.readers", "a") as readers:  # the lock every run reading this set holds (common/data.py)
        try:
            fcntl.flock(readers, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"error: a run is reading {a.out}; wait for it to end, or pass another --out") from None
        meta = generate(a.out, a.n_train, a.n_test, a.n_classes, a.sample_rate, a.audio_seconds, a.frame_px,
                        a.min_frames, a.max_frames, a.audio_snr, a.visual_strength, a.uninformative_audio, a.seed)
    print(f"wrote {meta['n_train']} train and {meta['n_test']} test clips to {a.out}")
