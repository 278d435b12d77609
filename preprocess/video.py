"""Shared preprocessing steps: 1-fps JPEG frames (OpenCV), 16 kHz mono wav (the ffmpeg command line), a resumable
parallel runner with a progress bar and a count of failed clips, split-file writing, the video search and the
scripts' shared flags."""

import argparse
import glob
import os
import shutil
import subprocess
from concurrent.futures import ProcessPoolExecutor, as_completed

import cv2
from tqdm import tqdm

from common import cli

DONE = ".done"  # marker written last in a clip's frame folder: a clip with it is finished and skipped on re-runs


def extract_frames(video, out_dir, fps=1, quality=95):
    """Save the first frame of every 1/fps seconds as <out_dir>/<NNNNN>.jpg (NNNNN = source frame index)."""
    cap = cv2.VideoCapture(video)
    if not cap.isOpened():
        raise ValueError(f"{video}: OpenCV cannot open this video")
    src_fps = cap.get(cv2.CAP_PROP_FPS) or 0.0
    if src_fps <= 0:
        cap.release()
        raise ValueError(f"{video}: no frame rate in the container")
    os.makedirs(out_dir, exist_ok=True)
    step, next_t, index, saved = 1.0 / fps, 0.0, 0, 0
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        if index / src_fps >= next_t - 1e-9:  # first frame at or after each whole 1/fps second
            cv2.imwrite(os.path.join(out_dir, f"{index:05d}.jpg"), frame, [cv2.IMWRITE_JPEG_QUALITY, quality])
            saved += 1
            next_t += step
        index += 1
    cap.release()
    if saved == 0:
        raise ValueError(f"{video}: no decodable frames")
    return saved


def require_ffmpeg():
    if shutil.which("ffmpeg") is None:
        raise SystemExit(
            "ffmpeg not found on PATH: install it (e.g. `apt-get install ffmpeg` or `conda install ffmpeg`) "
            "to extract audio from the videos"
        )


def extract_audio(video, wav, sample_rate=16000):
    """ffmpeg -i VIDEO -vn -ac 1 -ar 16000 -acodec pcm_s16le WAV (mono 16-bit PCM)."""
    tmp = f"{wav}.tmp.wav"
    cmd = [
        "ffmpeg",
        "-nostdin",
        "-loglevel",
        "error",
        "-y",
        "-i",
        video,
        "-vn",
        "-ac",
        "1",
        "-ar",
        str(sample_rate),
        "-acodec",
        "pcm_s16le",
        tmp,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not os.path.isfile(tmp) or os.path.getsize(tmp) <= 44:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise ValueError(f"{video}: ffmpeg found no audio ({proc.stderr.strip()[:200]})")
    os.replace(tmp, wav)


def run_parallel(fn, jobs, workers, desc):
    """Run fn(*job) for every job on `workers` processes with a progress bar; return the list of (job, error)."""
    failed = []
    if workers <= 1:
        for job in tqdm(jobs, desc=desc):
            try:
                fn(*job)
            except Exception as e:  # one bad clip must not stop the others
                failed.append((job, str(e)))
        return failed
    with ProcessPoolExecutor(workers) as pool:
        futures = {pool.submit(fn, *job): job for job in jobs}
        for fut in tqdm(as_completed(futures), total=len(futures), desc=desc):
            try:
                fut.result()
            except Exception as e:
                failed.append((futures[fut], str(e)))
    return failed


def report_failures(failed, total, log_path):
    if not failed:
        print(f"all {total} clips done")
        return
    with open(log_path, "w") as f:
        for job, err in failed:
            f.write(f"{job[0]}\t{err}\n")
    print(
        f"{len(failed)} of {total} clips failed (first: {failed[0][1]}); list in {log_path}. "
        "The loaders skip them with a counted warning."
    )


def write_split(path, rows):
    """Header-less `<clip_id>,<label>` rows."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        f.writelines(f"{a},{b}\n" for a, b in rows)


def process_clip(video, clip_id, out, sample_rate, need_audio=True):
    """Flat layout: <out>/frames/<clip_id>/*.jpg and <out>/audio/<clip_id>.wav; skips finished clips."""
    frame_dir = os.path.join(out, "frames", clip_id)
    wav = os.path.join(out, "audio", f"{clip_id}.wav")
    if os.path.isfile(os.path.join(frame_dir, DONE)) and (not need_audio or os.path.isfile(wav)):
        return
    if need_audio:
        extract_audio(video, wav, sample_rate)
    shutil.rmtree(frame_dir, ignore_errors=True)  # a half-written folder from an interrupted run
    extract_frames(video, frame_dir)
    open(os.path.join(frame_dir, DONE), "w").close()


def find_videos(root):
    """{clip id: path} of every <clip id>.mp4 below root (searched recursively)."""
    paths = glob.glob(os.path.join(root, "**", "*.mp4"), recursive=True)
    return {os.path.splitext(os.path.basename(v))[0]: v for v in paths}


def video_parser(doc, out):
    """The parser of a video preprocessing script (one-line errors): --out (default `out`), --sample-rate, --workers."""
    p = cli.Parser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=out, help="output folder")
    p.add_argument("--sample-rate", type=cli.positive(int), default=16000, help="wav sample rate")
    p.add_argument("--workers", type=cli.positive(int), default=os.cpu_count(), help="parallel processes")
    return p
