"""Write a synthetic set by hand (the scripts write the default one on first use): a small seeded audio-visual
dataset in the CREMA-D on-disk layout. Its layout, cues and regimes: common/synthetic.py and docs/data.md.

    python -m preprocess.synthetic --out data/synthetic            # the default small set (seconds to write)
    python -m preprocess.synthetic --out /tmp/big --audio-seconds 3 --sample-rate 22050 --frame-px 224  # real size
    python -m preprocess.synthetic --out data/regimes/visual-dominant/synthetic --regime visual-dominant
    python -m preprocess.synthetic --out /tmp/mine/synthetic --dominant visual --weak-absent 0.5 --noise 1.5

`--regime NAME` sets the four knobs `--dominant`, `--weak-absent`, `--dominant-absent`, `--noise`; each knob given on
the command line overrides the regime's, and `--audio-snr`, `--visual-strength`, `--uninformative-audio`,
`--uninformative-visual` override what the knobs set. Run the scripts on such a set with `--data-root` pointing at
the folder that holds `synthetic/`.
"""

import argparse
import fcntl
import os

from common import cli
from common.synthetic import EMOTIONS, KNOBS, REGIMES, generate, regime_args, regime_params


def main(argv=None):
    share, pos, pos_int = cli.between(0, 1), cli.positive(), cli.positive(int)
    p = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # one-line errors
    p.add_argument("--out", default="data/synthetic", help="output folder")
    p.add_argument("--n-train", type=pos_int, default=None, help="training clips (default: the regime's, 600 or 420)")
    p.add_argument("--n-test", type=pos_int, default=None, help="test clips (default: the regime's, 300 or 240)")
    p.add_argument(
        "--n-classes", type=cli.between(1, len(EMOTIONS), int, " (CREMA-D label names)"), default=6, help="classes"
    )
    p.add_argument("--sample-rate", type=pos_int, default=16000, help="wav sample rate (CREMA-D files are 16 kHz)")
    p.add_argument("--audio-seconds", type=pos, default=1.0, help="clip length in seconds")
    p.add_argument("--frame-px", type=pos_int, default=40, help="frame side in pixels")
    p.add_argument("--min-frames", type=pos_int, default=2, help="fewest frames per clip")
    p.add_argument("--max-frames", type=pos_int, default=3, help="most frames per clip")
    p.add_argument(
        "--regime",
        default="default",
        choices=sorted(REGIMES),
        help="named setting of the four knobs below (docs/data.md, Regimes)",
    )
    p.add_argument(
        "--dominant",
        default=None,
        choices=["audio", "visual"],
        help="which modality gets the easy cue (the other the faint one); default: the regime's",
    )
    p.add_argument(
        "--weak-absent",
        type=share,
        default=None,
        help="share of clips whose weak modality is noise only; default: the regime's",
    )
    p.add_argument(
        "--dominant-absent",
        type=share,
        default=None,
        help="share of clips whose dominant modality is noise only; default: the regime's",
    )
    p.add_argument("--noise", type=pos, default=None, help="factor on both modalities' noise; default: the regime's")
    p.add_argument("--audio-snr", type=cli.at_least(0), default=None, help="audio tone strength (overrides --dominant)")
    p.add_argument(
        "--visual-strength", type=cli.at_least(0), default=None, help="visual pattern strength (overrides --dominant)"
    )
    p.add_argument(
        "--uninformative-audio",
        type=share,
        default=None,
        help="share of clips whose audio is noise only (overrides the absent shares)",
    )
    p.add_argument(
        "--uninformative-visual",
        type=share,
        default=None,
        help="share of clips whose frames carry no cue (overrides the absent shares)",
    )
    p.add_argument("--seed", type=int, default=0, help="generator seed")
    a = p.parse_args(argv)
    # the regime's arguments, then the knobs given on the command line, then the low-level flags given
    knobs = {k: REGIMES[a.regime][k] if getattr(a, k) is None else getattr(a, k) for k in KNOBS}
    for k, v in {**regime_args(a.regime), **regime_params(**knobs)}.items():
        if getattr(a, k, None) is None:
            setattr(a, k, v)
    if a.max_frames < a.min_frames:
        p.error(f"--max-frames must be >= --min-frames ({a.min_frames}), got {a.max_frames}")
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(f"{a.out}.readers", "a") as readers:  # the lock every run reading this set holds (ensure_synthetic)
        try:
            fcntl.flock(readers, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"error: a run is reading {a.out}; wait for it to end, or pass another --out") from None
        meta = generate(
            a.out,
            a.n_train,
            a.n_test,
            a.n_classes,
            a.sample_rate,
            a.audio_seconds,
            a.frame_px,
            a.min_frames,
            a.max_frames,
            a.audio_snr,
            a.visual_strength,
            a.uninformative_audio,
            a.seed,
            a.uninformative_visual,
            a.noise,
        )
    print(f"wrote {meta['n_train']} train and {meta['n_test']} test clips to {a.out}")


if __name__ == "__main__":
    main()
