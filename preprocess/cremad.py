"""CREMA-D: video files to 1-fps JPEG frames (OpenCV), audio as provided, and the train/test split CSVs.

    python -m preprocess.cremad --src /path/to/CREMA-D --out data/cremad [--splits /path/with/train.csv+test.csv]

--src is a CREMA-D checkout (github.com/CheyneyComputerScience/CREMA-D, git-LFS) with VideoFlash/*.flv and
AudioWAV/*.wav. Output, in the layout the loader reads (docs/data.md):
    <out>/AudioWAV/<clip_id>.wav                (copied as provided, 16 kHz mono)
    <out>/Image-01-FPS/<clip_id>/<NNNNN>.jpg    (first frame of every second)
    <out>/train.csv, <out>/test.csv             (`<clip_id>,<EMO>` rows)
With --splits, the official 6,698 / 744 lists are copied (the OGM-GE repository ships them as
data/CREMAD/train.csv and test.csv); otherwise a deterministic stratified split (per emotion, --test-fraction)
is written. Re-running skips finished clips.
"""

import argparse
import glob
import os
import shutil

import numpy as np

from common import cli
from preprocess.video import DONE, extract_frames, report_failures, run_parallel

EMOTIONS = ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"]
VIDEO_EXTS = (".flv", ".mp4", ".avi", ".mkv")


def process(video, clip_id, src, out):
    wav_src, wav_dst = os.path.join(src, "AudioWAV", f"{clip_id}.wav"), os.path.join(out, "AudioWAV", f"{clip_id}.wav")
    if not os.path.isfile(wav_src):
        raise ValueError(f"{wav_src}: no audio for this video")
    if not os.path.isfile(wav_dst):
        shutil.copyfile(wav_src, wav_dst)
    frame_dir = os.path.join(out, "Image-01-FPS", clip_id)
    if os.path.isfile(os.path.join(frame_dir, DONE)):
        return
    shutil.rmtree(frame_dir, ignore_errors=True)
    extract_frames(video, frame_dir)
    open(os.path.join(frame_dir, DONE), "w").close()


def stratified_split(clip_ids, test_fraction, seed):
    """Per emotion: sort the ids, shuffle with a seeded generator, and put round(fraction * n) into test."""
    rng = np.random.RandomState(seed)
    train, test = [], []
    for emo in EMOTIONS:
        ids = sorted(c for c in clip_ids if c.split("_")[2] == emo)
        rng.shuffle(ids)
        k = int(round(test_fraction * len(ids)))
        test += ids[:k]
        train += ids[k:]
    return sorted(train), sorted(test)


def write_rows(path, ids):
    with open(path, "w", newline="") as f:
        f.writelines(f"{c},{c.split('_')[2]}\r\n" for c in ids)


def main(argv=None):
    p = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # one-line errors
    p.add_argument("--src", required=True, help="CREMA-D checkout with VideoFlash/ and AudioWAV/")
    p.add_argument("--out", default="data/cremad", help="output folder")
    p.add_argument(
        "--splits", default=None, help="folder with the official train.csv and test.csv (copied as they are)"
    )
    p.add_argument(
        "--test-fraction", type=float, default=0.1, help="test share of the stratified split (without --splits)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the stratified split")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="parallel processes")
    a = p.parse_args(argv)
    cli.check(a, "workers", lambda x: x > 0, "positive")
    cli.check(a, "test_fraction", lambda x: 0 < x < 1, "in (0, 1)")
    for split in ("train", "test") if a.splits else ():  # before the long conversion, not after it
        cli.require(
            os.path.join(a.splits, f"{split}.csv"),
            "--splits",
            "it must hold the official train.csv and test.csv",
            kind="file",
        )
    video_dir = os.path.join(a.src, "VideoFlash")
    if not os.path.isdir(video_dir):
        raise SystemExit(
            f"{video_dir} not found: --src must be a CREMA-D checkout with VideoFlash/ and AudioWAV/ "
            "(git lfs pull fetches the media files)"
        )
    videos = sorted(v for v in glob.glob(os.path.join(video_dir, "*")) if v.lower().endswith(VIDEO_EXTS))
    jobs = []
    for v in videos:
        clip_id = os.path.splitext(os.path.basename(v))[0]
        if len(clip_id.split("_")) < 3 or clip_id.split("_")[2] not in EMOTIONS:
            print(f"skipping {v}: not a CREMA-D clip name (<actor>_<sentence>_<EMO>_<level>)")
            continue
        jobs.append((v, clip_id, a.src, a.out))
    if not jobs:
        raise SystemExit(f"no CREMA-D videos in {video_dir}")
    os.makedirs(os.path.join(a.out, "AudioWAV"), exist_ok=True)
    os.makedirs(os.path.join(a.out, "Image-01-FPS"), exist_ok=True)
    failed = run_parallel(process, jobs, a.workers, "CREMA-D clips")
    report_failures(failed, len(jobs), os.path.join(a.out, "failed.txt"))
    if a.splits:
        for split in ("train", "test"):
            src = os.path.join(a.splits, f"{split}.csv")
            if not os.path.isfile(src):
                raise SystemExit(f"{src} not found: --splits must hold the official train.csv and test.csv")
            shutil.copyfile(src, os.path.join(a.out, f"{split}.csv"))
        print(f"copied the official split files from {a.splits}")
    else:
        bad = {j[1] for j, _ in failed}
        train, test = stratified_split([j[1] for j in jobs if j[1] not in bad], a.test_fraction, a.seed)
        write_rows(os.path.join(a.out, "train.csv"), train)
        write_rows(os.path.join(a.out, "test.csv"), test)
        print(f"wrote a stratified split: {len(train)} train / {len(test)} test (not the official lists)")


if __name__ == "__main__":
    main()
