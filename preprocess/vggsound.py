"""VGGSound: mp4 clips to 16 kHz mono wav (ffmpeg) and 1-fps JPEG frames (OpenCV), plus the split files.

    python -m preprocess.vggsound --videos /path/to/vggsound_videos --csv /path/to/vggsound.csv \
        --out data/vggsound --workers 16

--csv is the official vggsound.csv (rows `<youtube_id>,<start_seconds>,<label text>,<train|test>`). Clip ids are
`<youtube_id>_<start:06d>` (docs/data.md); a video may be named with either the padded or the unpadded start.
Labels are the 309 label strings sorted alphabetically (written to classes.txt).
Output: the flat layout the loader reads (docs/data.md). Parallel, resumable, failed clips counted at the end.
"""

import argparse
import glob
import os

from common import cli
from common.splits import read_rows
from preprocess.video import process_clip, report_failures, require_ffmpeg, run_parallel, write_split


def main(argv=None):
    p = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # one-line errors
    p.add_argument("--videos", required=True, help="folder of mp4 files (searched recursively)")
    p.add_argument("--csv", required=True, help="the official vggsound.csv")
    p.add_argument("--out", default="data/vggsound", help="output folder")
    p.add_argument("--sample-rate", type=int, default=16000, help="wav sample rate")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="parallel processes")
    a = p.parse_args(argv)
    cli.check(a, "workers", lambda x: x > 0, "positive")
    cli.require(a.videos, "--videos", "pass the folder of the downloaded mp4 files")
    cli.require(a.csv, "--csv", "pass the official vggsound.csv", kind="file")
    require_ffmpeg()
    videos = {
        os.path.splitext(os.path.basename(v))[0]: v
        for v in glob.glob(os.path.join(a.videos, "**", "*.mp4"), recursive=True)
    }
    rows = [r for _, r in read_rows(a.csv) if len(r) >= 4]
    classes = sorted({r[2] for r in rows})
    os.makedirs(os.path.join(a.out, "audio"), exist_ok=True)
    with open(os.path.join(a.out, "classes.txt"), "w") as f:
        f.writelines(c + "\n" for c in classes)
    jobs = []
    for split in ("train", "test"):
        kept = []
        for ytid, start, label, s in (r[:4] for r in rows):
            if s != split:
                continue
            clip_id = f"{ytid}_{int(float(start)):06d}"
            video = videos.get(clip_id) or videos.get(f"{ytid}_{start}")
            if video is None:
                continue
            kept.append((clip_id, classes.index(label)))
            jobs.append((video, clip_id, a.out, a.sample_rate))
        write_split(os.path.join(a.out, "splits", f"{split}.csv"), kept)
        print(f"{split}: {len(kept)} of {sum(r[3] == split for r in rows)} listed clips have a video")
    failed = run_parallel(process_clip, jobs, a.workers, "VGGSound clips")
    report_failures(failed, len(jobs), os.path.join(a.out, "failed.txt"))


if __name__ == "__main__":
    main()
