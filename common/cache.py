"""The cache of decoded spectrograms and resized frames: its folders, their meta.json and the check the loader
runs before reading it (preprocess/cache.py writes it; docs/data.md, "Cache")."""

import hashlib
import json
import math
import os
from dataclasses import asdict

import numpy as np

from common.audio import AudioConfig

# -- the cache written by preprocess/cache.py: <root>/cache/audio-<key>/<id>.npy, <root>/cache/frames-<side>/<id>.npy
CACHE_FORMAT = 1


def audio_cache_key(name, cfg: AudioConfig):
    """`<pipeline>-<8 hex digits of the config's fields>`, or None if the pipeline's training window is random."""
    if cfg.train_start_max > 0:
        return None
    digest = hashlib.sha1(json.dumps(asdict(cfg), sort_keys=True).encode()).hexdigest()[:8]
    return f"{name}-{digest}"


def cache_meta(kind, **fields):
    """The meta.json content of a cache folder (written by preprocess/cache.py, compared by the loader)."""
    return json.loads(json.dumps(dict(format=CACHE_FORMAT, kind=kind, **fields), sort_keys=True))


def cache_command(args, side):
    """The `python -m preprocess.cache ...` command that writes the cache these data flags read."""
    cmd = f"python -m preprocess.cache --dataset {args.dataset} --data-root {args.data_root}"
    if args.audio_pipeline:
        cmd += f" --audio-pipeline {args.audio_pipeline}"
    if args.audio_seconds:
        cmd += f" --audio-seconds {args.audio_seconds}"
    if args.n_frames:
        cmd += f" --n-frames {args.n_frames}"
    if getattr(args, "legacy_loader", False):
        cmd += " --legacy-loader"
    return cmd + f" --frame-side {side}"


def cache_folders(root, audio_name, audio_cfg, side):
    """{kind: (folder, meta.json content)} of the cache for these settings: "audio" (only for a fixed-window pipeline)
    and "frames". preprocess/cache.py writes exactly these folders and --cache reads them."""
    folders = {}
    key = audio_cache_key(audio_name, audio_cfg)
    if key:
        folders["audio"] = (
            os.path.join(root, "cache", f"audio-{key}"),
            cache_meta("audio", pipeline=audio_name, config=asdict(audio_cfg)),
        )
    folders["frames"] = (os.path.join(root, "cache", f"frames-{side}"), cache_meta("frames", side=side))
    return folders


def check_cache(args, root, audio_name, audio_cfg, clips):
    """(audio folder or None, frames folder) of the cache --cache reads; one-line SystemExit if it is missing, was
    written for other settings, or lacks an entry for a clip of the splits (then it is stale)."""
    side = args.cache_frame_side
    cmd = cache_command(args, side)
    by_kind = cache_folders(root, audio_name, audio_cfg, side)
    folders = list(by_kind.values())
    for folder, want in folders:
        meta_path = os.path.join(folder, "meta.json")
        if not os.path.isfile(meta_path):
            present = (
                sorted(os.listdir(os.path.join(root, "cache"))) if os.path.isdir(os.path.join(root, "cache")) else []
            )
            raise SystemExit(
                f"--cache: {folder} not found or unfinished (no meta.json; present: {', '.join(present) or 'none'}); "
                f"write it with `{cmd}`"
            )
        with open(meta_path) as f:
            meta = json.load(f)
        if any(meta.get(k) != v for k, v in want.items()):
            raise SystemExit(f"--cache: {meta_path} was written for other settings; delete {folder} and run `{cmd}`")
    missing = [
        os.path.join(folder, f"{c.clip_id}.npy")
        for folder, _ in folders
        for c in clips
        if not os.path.isfile(os.path.join(folder, f"{c.clip_id}.npy"))
    ]
    if missing:
        raise SystemExit(
            f"--cache: {len(missing)} entries of the splits' clips are missing (first: {', '.join(missing[:2])}); "
            f"the cache is stale (or these clips failed to cache): update it with `{cmd}`"
        )
    return by_kind["audio"][0] if "audio" in by_kind else None, by_kind["frames"][0]


def check_entry(path, kind, n_frames=1):
    """Start-up check of one cache entry, its .npy header only: None if it looks whole, else the reason to skip its
    clip: "empty cache entry", "corrupt cache entry" (not an .npy file, or not the array its kind holds: float32
    (F, T) audio, uint8 (n, H, W, 3) frames with n >= n_frames) or "truncated cache entry" (shorter than its
    header says)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                return "empty cache entry"
            version = np.lib.format.read_magic(f)
            read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            shape, _, dtype = read[version](f)
            offset = f.tell()
    except (OSError, ValueError, KeyError, SyntaxError):
        return "corrupt cache entry"
    if kind == "audio":
        ok = dtype == np.float32 and len(shape) == 2
    else:
        ok = dtype == np.uint8 and len(shape) == 4 and shape[3] == 3 and shape[0] >= n_frames
    if not ok:
        return "corrupt cache entry"
    return "truncated cache entry" if size < offset + math.prod(shape) * dtype.itemsize else None
