"""Kinetics-Sounds: mp4 clips to 16 kHz mono wav (ffmpeg) and 1-fps JPEG frames (OpenCV), plus the split files.

    python -m preprocess.kinetics_sounds --videos /path/to/ks_videos --splits /path/with/my_train.txt+my_test.txt \
        --out data/kinetics_sounds --workers 8

--videos holds <clip_id>.mp4 files (class sub-folders are fine). --splits holds the official split files
`my_train.txt` / `my_test.txt` (rows `<clip_id>,10,<label 0-30>`, the alphabetical 31-class order of docs/data.md).
Output: the flat layout the loader reads (docs/data.md): classes.txt, splits/{train,test}.csv, audio/<id>.wav,
frames/<id>/<NNNNN>.jpg. Parallel, resumable (finished clips are skipped), failed clips counted at the end.
"""

import os

from common import cli
from common.splits import KS_CLASSES, read_rows
from preprocess import video


def main(argv=None):
    p = video.video_parser(__doc__, "data/kinetics_sounds")  # --out, --sample-rate, --workers
    p.add_argument("--videos", required=True, help="folder of <clip_id>.mp4 files (searched recursively)")
    p.add_argument("--splits", required=True, help="folder holding my_train.txt and my_test.txt")
    a = p.parse_args(argv)
    cli.require(a.videos, "--videos", "pass the folder of the downloaded <clip_id>.mp4 files")
    for split in ("train", "test"):
        cli.require(
            os.path.join(a.splits, f"my_{split}.txt"),
            "--splits",
            "it must hold the official my_train.txt and my_test.txt",
            kind="file",
        )
    video.require_ffmpeg()
    videos = video.find_videos(a.videos)
    os.makedirs(os.path.join(a.out, "audio"), exist_ok=True)
    with open(os.path.join(a.out, "classes.txt"), "w") as f:
        f.writelines(c + "\n" for c in KS_CLASSES)
    jobs, missing = [], 0
    for split in ("train", "test"):
        rows = read_rows(os.path.join(a.splits, f"my_{split}.txt"))
        kept = []
        for line, row in rows:
            clip_id, label = row[0], row[-1]
            if clip_id not in videos:
                missing += 1
                continue
            kept.append((clip_id, label))
            jobs.append((videos[clip_id], clip_id, a.out, a.sample_rate))
        video.write_split(os.path.join(a.out, "splits", f"{split}.csv"), kept)
        print(f"{split}: {len(kept)} of {len(rows)} listed clips have a video")
    if missing:
        print(f"{missing} listed clips have no video under {a.videos} (YouTube attrition); they are left out")
    failed = video.run_parallel(video.process_clip, jobs, a.workers, "Kinetics-Sounds clips")
    video.report_failures(failed, len(jobs), os.path.join(a.out, "failed.txt"))


if __name__ == "__main__":
    main()
