"""Cache decoded audio spectrograms and resized frames, so that training with --cache skips wav reading, STFT and
JPEG decoding.

    python -m preprocess.cache --dataset cremad --data-root data [--audio-pipeline P] [--audio-seconds S]
        [--frame-side 256]
    python baseline.py --dataset cremad --cache

Indexes both splits exactly as training does (common/data.py: the same clips, the same skipped-clip warnings) and
writes, under <data-root>/<dataset>/cache/:
    audio-<pipeline>-<hash>/<clip_id>.npy  float32 (F, T): the spectrogram the audio pipeline returns (exact). Only
                                           for fixed-window pipelines: stft16k's training window is random.
    frames-<side>/<clip_id>.npy            uint8 (n_frames, H, W, 3): every frame of the clip in sorted order, resized
                                           so that its short side is <side> (torchvision Resize: PIL bilinear with
                                           antialias; smaller frames are kept as they are). --frame-side 0 keeps the
                                           decoded frames, which makes the cache exact.
    meta.json in each folder               what was cached; the loader checks it against its flags.
Resumable (existing entries are skipped; damaged ones, per common/cache.py check_entry, are written again); each
entry is written to a temporary name and renamed; parallel; the written / already present / failed entries are
counted at the end. After re-running a dataset's preprocess step, delete <dataset>/cache/.
"""

import argparse
import contextlib
import glob
import json
import os
from multiprocessing import Pool

import numpy as np
import soxr
import torch
import torchaudio
import torchvision.transforms.functional as TF
from PIL import Image
from tqdm import tqdm

from common import cli
from common.audio import AUDIO_PIPELINES, AudioPipeline, read_wav
from common.cache import cache_folders, check_entry
from common.data import DATASETS, audio_config, build_datasets
from common.flags import add_data_args
from common.frames import list_frames, load_frame

_WORKER = {}  # per process: the audio pipeline, the output folders and the frame side


def resize_short_side(image, side):
    """T.Resize(side) (PIL bilinear, antialiased) if the short side is larger than `side`; side 0 keeps the image."""
    if side == 0 or min(image.size) <= side:
        return image
    return TF.resize(image, side)


def save_atomic(path, array):
    """np.save to a temporary name, then rename: an interrupted write never leaves a half-written entry."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def clip_spectrogram(clip):
    samples, sr = read_wav(clip.wav)
    return _WORKER["audio"](samples, sr, train=False).numpy()  # fixed window: the training output too


def clip_frames(clip):
    """Every frame of the clip, decoded as the loader decodes them (load_frame: a corrupt JPEG fails the entry)."""
    names = list_frames(clip.frame_dir)
    frames = [Image.fromarray(load_frame(os.path.join(clip.frame_dir, n))) for n in names]
    return np.stack([np.asarray(resize_short_side(im, _WORKER["side"])) for im in frames])


def _init(audio_cfg, audio_dir, frames_dir, side):
    # one intra-op thread, always: the cached spectrograms are then bitwise those a one-thread reader computes
    # (docs/distributed.md); more threads may round the resampler/STFT differently on some CPUs
    torch.set_num_threads(1)
    _WORKER.update(audio=AudioPipeline(audio_cfg), audio_dir=audio_dir, frames_dir=frames_dir, side=side)


def cache_clip(clip):
    """[(kind, 'written' | 'present' | 'failed', error or None)] for the clip's audio (if cached) and frames entries."""
    out = []
    for kind, folder, make in (
        ("audio", _WORKER["audio_dir"], clip_spectrogram),
        ("frames", _WORKER["frames_dir"], clip_frames),
    ):
        if folder is None:
            continue
        path = os.path.join(folder, f"{clip.clip_id}.npy")
        if os.path.isfile(path) and check_entry(path, kind) is None:  # a damaged entry is written again
            out.append((kind, "present", None))
            continue
        try:
            save_atomic(path, make(clip))
            out.append((kind, "written", None))
        except Exception as e:  # one bad clip must not stop the others
            out.append((kind, "failed", f"{clip.clip_id}: {e}"))
    return out


def main(argv=None):
    p = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # one-line errors
    p.add_argument(
        "--dataset", required=True, choices=sorted(DATASETS), help="dataset to cache (as the scripts' --dataset)"
    )
    p.add_argument("--data-root", default="data", help="folder holding <dataset>/ (as the scripts' --data-root)")
    p.add_argument(
        "--audio-pipeline", default=None, choices=sorted(AUDIO_PIPELINES), help="audio recipe (default: the dataset's)"
    )
    p.add_argument("--audio-seconds", type=float, default=None, help="audio window in seconds (as the scripts' flag)")
    p.add_argument("--n-frames", type=int, default=None, help="index the clips as training with this --n-frames does")
    p.add_argument(
        "--frame-side", type=int, default=256, help="short side of the cached frames (0 = original size, exact)"
    )
    p.add_argument(
        "--legacy-loader",
        action="store_true",
        help="spectrograms of the previous loader (torchaudio resampling), for --cache --legacy-loader",
    )
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="parallel processes")
    a = p.parse_args(argv)
    cli.check(a, "workers", lambda x: x > 0, "positive")
    if a.frame_side < 0:
        raise SystemExit(f"--frame-side must be 0 (original size) or positive, got {a.frame_side}")
    root = os.path.join(a.data_root, DATASETS[a.dataset]["subdir"])
    if a.dataset != "synthetic" and not os.path.isdir(root):
        raise SystemExit(f"dataset root {root} not found: prepare the dataset first (see README) or pass --data-root")
    flags = ["--dataset", a.dataset, "--data-root", a.data_root]
    for flag, value in (
        ("--audio-pipeline", a.audio_pipeline),
        ("--audio-seconds", a.audio_seconds),
        ("--n-frames", a.n_frames),
    ):
        flags += [flag, str(value)] if value else []
    flags += ["--legacy-loader"] if a.legacy_loader else []
    args = add_data_args(argparse.ArgumentParser()).parse_args(flags)
    train_set, test_set, _ = build_datasets(args)  # the training index: same clips, same warnings
    clips = list({c.clip_id: c for c in train_set.clips + test_set.clips}.values())
    name, cfg = audio_config(args)
    # recorded besides, not checked
    extra = {
        "audio": dict(torch=torch.__version__, torchaudio=torchaudio.__version__, soxr=soxr.__version__),
        "frames": dict(
            resize="torchvision Resize(side): PIL bilinear, antialiased; frames with a short side <= side "
            "kept; side 0 = as decoded"
        ),
    }
    # kind -> (folder, what the loader checks in meta.json, what it records besides)
    metas = {
        kind: (folder, want, extra[kind])
        for kind, (folder, want) in cache_folders(root, name, cfg, a.frame_side).items()
    }
    if "audio" not in metas:
        print(
            f"audio not cached: the training window of the {name} pipeline is random, so its spectrogram is computed "
            "from the wav at every step (a few ms per clip, see docs/distributed.md)"
        )
    for folder, want, _ in metas.values():
        meta_path = os.path.join(folder, "meta.json")
        if os.path.isfile(meta_path):  # never mix entries written for other settings (or by another format version)
            with open(meta_path) as f:
                meta = json.load(f)
            if any(meta.get(k) != v for k, v in want.items()):
                raise SystemExit(f"{meta_path} was written for other settings; delete {folder} and run this again")
        os.makedirs(folder, exist_ok=True)
        for tmp in glob.glob(os.path.join(folder, "*.tmp")):  # left by an interrupted run
            os.remove(tmp)
    audio_dir = metas["audio"][0] if "audio" in metas else None
    init = (cfg, audio_dir, metas["frames"][0], a.frame_side)
    counts = {kind: {"written": 0, "present": 0, "failed": 0} for kind in metas}
    errors = []
    with Pool(a.workers, initializer=_init, initargs=init) if a.workers > 1 else contextlib.nullcontext() as pool:
        if pool is None:
            _init(*init)
        results = pool.imap_unordered(cache_clip, clips, chunksize=8) if pool else map(cache_clip, clips)
        for r in tqdm(results, total=len(clips), desc=f"caching {len(clips)} {a.dataset} clips"):
            for kind, status, err in r:
                counts[kind][status] += 1
                errors += [err] if err else []
    for kind, (folder, want, extra) in metas.items():
        c = counts[kind]
        meta = dict(want, **extra, clips=c["written"] + c["present"])
        tmp = os.path.join(folder, f"meta.json.{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=1, sort_keys=True)
        os.replace(tmp, os.path.join(folder, "meta.json"))
        print(f"{folder}: {c['written']} written, {c['present']} already present, {c['failed']} failed")
    if errors:
        print(f"{len(errors)} entries failed (first: {errors[0]}); --cache reports those clips as missing")
    return counts


if __name__ == "__main__":
    main()
