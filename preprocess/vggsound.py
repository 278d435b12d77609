"""VGGSound: mp4 clips to 16 kHz mono wav (ffmpeg) and 1-fps JPEG frames (OpenCV), plus the split files.

    python -m preprocess.vggsound --videos /path/to/vggsound_videos --csv /path/to/vggsound.csv \
        --out data/vggsound --workers 16

--csv is the official vggsound.csv (rows `<youtube_id>,<start_seconds>,<label text>,<train|test>`). Clip ids are
`<youtube_id>_<start:06d>` (docs/data.md); a video may be named with either the padded or the unpadded start.
Labels are the 309 label strings sorted alphabetically (written to classes.txt).
Output: the flat layout the loader reads (docs/data.md). Parallel, resumable, failed clips counted at the end.
"""

import os

from common import cli
from common.splits import read_rows
from preprocess import video


def main(argv=None):
    p = video.video_parser(__doc__, "data/vggsound")  # --out, --sample-rate, --workers
    p.add_argument("--videos", required=True, help="folder of mp4 files (searched recursively)")
    p.add_argument("--csv", required=True, help="the official vggsound.csv")
    a = p.parse_args(argv)
    cli.require(a.videos, "--videos", "pass the folder of the downloaded mp4 files")
    cli.require(a.csv, "--csv", "pass the official vggsound.csv", kind="file")
    video.require_ffmpeg()
    videos = video.find_videos(a.videos)
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
            path = videos.get(clip_id) or videos.get(f"{ytid}_{start}")
            if path is None:
                continue
            kept.append((clip_id, classes.index(label)))
            jobs.append((path, clip_id, a.out, a.sample_rate))
        video.write_split(os.path.join(a.out, "splits", f"{split}.csv"), kept)
        print(f"{split}: {len(kept)} of {sum(r[3] == split for r in rows)} listed clips have a video")
    failed = video.run_parallel(video.process_clip, jobs, a.workers, "VGGSound clips")
    video.report_failures(failed, len(jobs), os.path.join(a.out, "failed.txt"))


if __name__ == "__main__":
    main()
