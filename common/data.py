"""Audio-visual datasets: CREMA-D, Kinetics-Sounds, VGGSound and the synthetic CREMA-D-layout set (docs/data.md).

Every dataset yields `(spec (F, T) float32, frames (3, T_f, H, W) float32, label int64)`.
Audio and frames are paired by clip id, never by position; frames come from a *sorted* listing
(random within equal segments when training, the segment middles at test); the test-time audio
window is deterministic.
"""

import csv
import json
import os
import random
import shutil
import warnings
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image

from common import distributed
from common.audio import AUDIO_PIPELINES, AudioConfig, AudioPipeline, read_wav, wav_info
from common.cache import check_cache
from common.frames import FrameConfig, FrameTransform, list_frames, load_image, select_frames

CREMAD_LABELS = ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"]  # fixed order (docs/data.md)
KS_CLASSES = [
    "blowing_nose", "blowing_out_candles", "bowling", "chopping_wood", "dribbling_basketball", "laughing",
    "mowing_lawn", "playing_accordion", "playing_bagpipes", "playing_bass_guitar", "playing_clarinet",
    "playing_drums", "playing_guitar", "playing_harmonica", "playing_keyboard", "playing_organ", "playing_piano",
    "playing_saxophone", "playing_trombone", "playing_trumpet", "playing_violin", "playing_xylophone",
    "ripping_paper", "shoveling_snow", "shuffling_cards", "singing", "stomping_grapes", "tap_dancing",
    "tapping_guitar", "tapping_pen", "tickling",
]  # alphabetical, label index = position (docs/data.md)


class SkippedClipsWarning(UserWarning):
    """Raised (as a warning) when clips named by a split file are dropped; the message counts them."""


# ---------------------------------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Clip:
    clip_id: str
    wav: str
    frame_dir: str
    label: int


class AVDataset(torch.utils.data.Dataset):
    """Clips already paired by id; returns (spec (F, T), frames (3, T_f, H, W), label).

    `audio_cache` / `frame_cache`: folders written by `python -m preprocess.cache` (--cache); the spectrogram is
    then read from `<audio_cache>/<id>.npy`, the frames from the rows of `<frame_cache>/<id>.npy`.
    """

    def __init__(self, clips, audio_cfg: AudioConfig, frame_cfg: FrameConfig, train: bool, class_names=None,
                 audio_cache=None, frame_cache=None):
        self.clips, self.train, self.class_names = list(clips), train, class_names
        self.audio, self.frame_cfg, self.frames_tf = AudioPipeline(audio_cfg), frame_cfg, FrameTransform(frame_cfg)
        self.audio_cache, self.frame_cache = audio_cache, frame_cache
        self.skipped = {}  # reason -> list of clip ids, filled by the index builders

    def __len__(self):
        return len(self.clips)

    def __getitem__(self, i):
        c = self.clips[i]
        if self.audio_cache:
            spec = torch.from_numpy(np.load(os.path.join(self.audio_cache, f"{c.clip_id}.npy")))
        else:
            samples, sr = read_wav(c.wav)
            spec = self.audio(samples, sr, self.train)
        if self.frame_cache:  # (n_frames_on_disk, H, W, 3) uint8; mmap reads only the selected rows
            frames = np.load(os.path.join(self.frame_cache, f"{c.clip_id}.npy"), mmap_mode="r")
            idx = select_frames(len(frames), self.frame_cfg.n_frames, self.train, self.frame_cfg.select)
            images = [Image.fromarray(np.array(frames[k])) for k in idx]
        else:
            names = list_frames(c.frame_dir)
            idx = select_frames(len(names), self.frame_cfg.n_frames, self.train, self.frame_cfg.select)
            images = [load_image(os.path.join(c.frame_dir, names[k])) for k in idx]
        return spec, self.frames_tf(images, self.train), torch.tensor(c.label, dtype=torch.long)


def read_rows(path):
    """Rows of a header-less CSV/TXT split file: BOM stripped, CRLF or LF, blank lines ignored."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"split file {path} not found; run the preprocess step or pass --data-root")
    with open(path, newline="", encoding="utf-8-sig") as f:
        return [
            (n, [x.strip() for x in row])
            for n, row in enumerate(csv.reader(f), 1)
            if row and any(x.strip() for x in row)
        ]


def index_clips(rows, split_path, label_of, wav_of, frames_of, n_frames):
    """Pair audio and frames by clip id; drop (with a counted warning) clips whose files are missing or short."""
    clips, skipped, seen = [], {}, set()
    for line, row in rows:
        clip_id, label = label_of(line, row)
        if clip_id in seen:
            skipped.setdefault("duplicate row", []).append(clip_id)
            continue
        seen.add(clip_id)
        wav, frame_dir = wav_of(clip_id), frames_of(clip_id)
        if not os.path.isfile(wav):
            skipped.setdefault("missing wav", []).append(clip_id)
            continue
        try:
            sr, n = wav_info(wav)
        except ValueError:
            skipped.setdefault("unreadable wav", []).append(clip_id)
            continue
        if n == 0:
            skipped.setdefault("empty wav", []).append(clip_id)
            continue
        n_found = len(list_frames(frame_dir))
        if n_found == 0:
            skipped.setdefault("missing frames", []).append(clip_id)
            continue
        if n_found < n_frames:
            skipped.setdefault(f"fewer than {n_frames} frames", []).append(clip_id)
            continue
        assert os.path.splitext(os.path.basename(wav))[0] == os.path.basename(os.path.normpath(frame_dir)) == clip_id
        clips.append(Clip(clip_id, wav, frame_dir, label))
    if skipped:
        total = sum(len(v) for v in skipped.values())
        parts = "; ".join(f"{k}: {len(v)} (first: {', '.join(v[:3])})" for k, v in skipped.items())
        warnings.warn(
            f"{split_path}: skipped {total} of {len(rows)} clips ({parts})", SkippedClipsWarning, stacklevel=3
        )
    if not clips:
        raise FileNotFoundError(f"{split_path}: none of its {len(rows)} clips were found on disk; check --data-root")
    return clips, skipped


def _check_root(root, dataset):
    if not os.path.isdir(root):
        hint = {"cremad": "python -m preprocess.cremad", "ks": "python -m preprocess.kinetics_sounds",
                "vggsound": "python -m preprocess.vggsound"}.get(dataset, "")
        raise FileNotFoundError(
            f"dataset root {root} not found; prepare it with `{hint} ...` (see README) or pass --data-root"
        )


def cremad_clips(root, split, n_frames, fps=1):
    """CREMA-D layout (docs/data.md): AudioWAV/<id>.wav, Image-01-FPS/<id>/*.jpg, {train,test}.csv rows `<id>,<EMO>`."""
    _check_root(root, "cremad")
    split_path = next(
        (
            p
            for p in (os.path.join(root, f"{split}.csv"), os.path.join(root, "annotations", f"{split}.csv"))
            if os.path.isfile(p)
        ),
        os.path.join(root, f"{split}.csv"),
    )
    rows = read_rows(split_path)

    def label_of(line, row):
        if len(row) < 2 or row[1] not in CREMAD_LABELS:
            got = row[1] if len(row) > 1 else "nothing"
            raise ValueError(f"{split_path}:{line}: unknown label {got!r}; expected one of {', '.join(CREMAD_LABELS)}")
        return row[0], CREMAD_LABELS.index(row[1])

    return index_clips(rows, split_path, label_of, lambda c: os.path.join(root, "AudioWAV", f"{c}.wav"),
                       lambda c: os.path.join(root, f"Image-{fps:02d}-FPS", c), n_frames)


def read_classes(path):
    with open(path, encoding="utf-8-sig") as f:
        return [line.strip() for line in f if line.strip()]


def flat_clips(root, split, n_frames, dataset, default_classes=None):
    """Flat layout (docs/data.md), used for Kinetics-Sounds and VGGSound.

    <root>/classes.txt, <root>/audio/<id>.wav, <root>/frames/<id>/*.jpg and one split file, tried in order:
    splits/{split}.csv (`<id>,<label>`), my_{split}.txt (the official KS rows `<id>,10,<label>`), or, for VGGSound,
    the official vggsound.csv (`<ytid>,<start>,<label text>,<split>`, labels sorted alphabetically).
    Labels may be indices or class names.
    """
    _check_root(root, dataset)
    classes_path = os.path.join(root, "classes.txt")
    classes = read_classes(classes_path) if os.path.isfile(classes_path) else default_classes
    candidates = [os.path.join(root, "splits", f"{split}.csv"), os.path.join(root, f"my_{split}.txt")]
    split_path = next((p for p in candidates if os.path.isfile(p)), None)
    vgg_csv = os.path.join(root, "vggsound.csv")
    if split_path is None and os.path.isfile(vgg_csv):
        split_path = vgg_csv
        all_rows = read_rows(vgg_csv)
        classes = classes or sorted({r[2] for _, r in all_rows if len(r) >= 4})
        rows = [(n, [f"{r[0]}_{int(float(r[1])):06d}", r[2]]) for n, r in all_rows if len(r) >= 4 and r[3] == split]
    else:
        if split_path is None:
            raise FileNotFoundError(
                f"no split file for '{split}' under {root}: expected one of {', '.join(candidates)}"
            )
        rows = read_rows(split_path)
    if not classes:
        raise FileNotFoundError(f"{classes_path} not found: one class name per line, line number = label index")

    def label_of(line, row):
        raw = row[-1] if len(row) >= 2 else ""
        if raw.lstrip("-").isdigit():
            if not 0 <= int(raw) < len(classes):
                raise ValueError(f"{split_path}:{line}: label {raw} out of range 0..{len(classes) - 1}")
            return row[0], int(raw)
        if raw not in classes:
            raise ValueError(f"{split_path}:{line}: unknown label {raw!r} (not in {classes_path})")
        return row[0], classes.index(raw)

    clips, skipped = index_clips(rows, split_path, label_of, lambda c: os.path.join(root, "audio", f"{c}.wav"),
                                 lambda c: os.path.join(root, "frames", c), n_frames)
    return clips, skipped, classes


# dataset name -> facts and default loader parameters (docs/data.md)
DATASETS = {
    "cremad": dict(num_classes=6, n_frames=1, frame_size=224, audio="cremad", subdir="cremad", num_workers=4),
    "ks": dict(num_classes=31, n_frames=3, frame_size=224, audio="stft16k", subdir="kinetics_sounds", num_workers=4),
    "vggsound": dict(num_classes=309, n_frames=3, frame_size=224, audio="stft16k", subdir="vggsound", num_workers=4),
    "synthetic": dict(num_classes=6, n_frames=1, frame_size=32, audio="synthetic", subdir="synthetic", num_workers=0),
}


def add_data_args(parser):
    """The data flags every script shares (defaults: the official per-dataset values of data.md)."""
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default="synthetic", choices=sorted(DATASETS), help="which dataset to train on")
    g.add_argument("--data-root", default="data",
                   help="folder holding <dataset>/ (synthetic is generated here on first use)")
    g.add_argument("--n-frames", type=int, default=None,
                   help="frames per clip (default: 1 CREMA-D/synthetic, 3 KS/VGGSound)")
    g.add_argument("--frame-size", type=int, default=None, help="frame side in pixels (default 224; synthetic 32)")
    g.add_argument("--frame-select", default="segment", choices=["segment", "first"],
                   help="frame sampling rule (docs/data.md)")
    g.add_argument("--clip-consistent-aug", action="store_true", help="one crop/flip per clip instead of per frame")
    g.add_argument("--tpami-frames", action="store_true",
                   help="T-PAMI frame transforms: crop scale (0.25, 1), test resize+center crop")
    g.add_argument("--audio-pipeline", default=None, choices=sorted(AUDIO_PIPELINES),
                   help="audio recipe (default: cremad for CREMA-D, stft16k for KS/VGGSound); also --ks-audio")
    g.add_argument("--ks-audio", dest="audio_pipeline", choices=["stft16k", "pkl1004", "fbank", "aug35k"],
                   help="alias of --audio-pipeline")
    g.add_argument("--audio-seconds", type=float, default=None,
                   help="audio window in seconds (e.g. 20 for AUG's CREMA-D setup)")
    g.add_argument("--num-workers", type=int, default=None,
                   help="DataLoader worker processes (default: 0 synthetic, else 4 capped at the CPU count)")
    g.add_argument("--cache", action="store_true",
                   help="read spectrograms and frames written by `python -m preprocess.cache`")
    g.add_argument("--cache-frame-side", type=int, default=256,
                   help="short side of the cached frames to read (0 = original size)")
    g.add_argument(
        "--in-memory",
        action="store_true",
        help="benchmarks: random in-memory tensors at the dataset's input sizes instead of its files (no data loading)",
    )
    return parser


def ensure_synthetic(root):
    """Generate the default synthetic set on first use, or again if it was written with other generator defaults.

    Written to a temporary folder and renamed into place, so runs started together never read a half-written set.
    """
    from common.synthetic import DEFAULTS, generate

    meta_path = os.path.join(root, "meta.json")
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("custom") or meta == DEFAULTS:
            return
        print(f"{root} was written with other generator settings; regenerating with the current defaults")
    else:
        print(f"generating the synthetic dataset in {root} (first use)")
    tmp = f"{root}.tmp{os.getpid()}"
    generate(tmp)
    if os.path.isdir(root):
        os.rename(root, f"{root}.old{os.getpid()}")
        shutil.rmtree(f"{root}.old{os.getpid()}")
    try:
        os.rename(tmp, root)
    except OSError:  # another process finished first: use its copy
        shutil.rmtree(tmp, ignore_errors=True)


def audio_config(args):
    """(pipeline name, AudioConfig) of the data flags: --audio-pipeline or the dataset's, with --audio-seconds
    applied."""
    name = args.audio_pipeline or DATASETS[args.dataset]["audio"]
    cfg = AUDIO_PIPELINES[name]
    if args.audio_seconds:
        cfg = replace(cfg, clip_seconds=args.audio_seconds, tile_seconds=max(cfg.tile_seconds, args.audio_seconds))
    return name, cfg


def build_datasets(args):
    """(train_set, test_set, class_names) for args.dataset, with the loader flags resolved to per-dataset defaults."""
    facts = DATASETS[args.dataset]
    if getattr(args, "num_workers", None) is None:  # the table's default, capped at the CPUs this process may use
        args.num_workers = min(facts["num_workers"], len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                               else os.cpu_count() or 1)
    n_frames = args.n_frames or facts["n_frames"]
    size = args.frame_size or facts["frame_size"]
    audio_name, audio_cfg = audio_config(args)
    frame_cfg = FrameConfig(
        n_frames,
        size,
        args.frame_select,
        args.clip_consistent_aug,
        (0.25, 1.0) if args.tpami_frames else (0.08, 1.0),
        "center" if args.tpami_frames else "square",
    )
    if getattr(args, "in_memory", False):
        return in_memory_datasets(args.dataset, audio_cfg, n_frames, size)
    root = os.path.join(args.data_root, facts["subdir"])
    if args.dataset == "synthetic":
        ensure_synthetic(root)
    sets = []
    for split, train in (("train", True), ("test", False)):
        if args.dataset in ("cremad", "synthetic"):
            clips, skipped = cremad_clips(root, split, n_frames)
            classes = CREMAD_LABELS
        else:
            clips, skipped, classes = flat_clips(
                root, split, n_frames, args.dataset, KS_CLASSES if args.dataset == "ks" else None
            )
        ds = AVDataset(clips, audio_cfg, frame_cfg, train, classes)
        ds.skipped = skipped
        sets.append(ds)
    if getattr(args, "cache", False):
        audio_dir, frames_dir = check_cache(args, root, audio_name, audio_cfg, sets[0].clips + sets[1].clips)
        for ds in sets:
            ds.audio_cache, ds.frame_cache = audio_dir, frames_dir
    return sets[0], sets[1], sets[0].class_names


class InMemoryClips(torch.utils.data.Dataset):
    """`n` clips of random tensors of the given shapes (a pool of 8, repeated) with random labels: the model step
    without any data loading, at a dataset's real input sizes (preprocess/benchmark.py, --in-memory)."""

    def __init__(self, n, spec_shape, frames_shape, class_names, seed):
        g = torch.Generator().manual_seed(seed)
        self.spec, self.frames = torch.randn(8, *spec_shape, generator=g), torch.randn(8, *frames_shape, generator=g)
        self.labels = torch.randint(len(class_names), (n,), generator=g)
        self.clips = [Clip(str(i), "", "", int(y)) for i, y in enumerate(self.labels)]
        self.class_names, self.skipped = class_names, {}

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.spec[i % 8], self.frames[i % 8], self.labels[i]


def spectrogram_shape(cfg: AudioConfig):
    """(F, T) of an STFT pipeline: n_fft // 2 + 1 bins, 1 + samples // hop centred frames (CREMA-D 257 x 188)."""
    if cfg.kind != "stft":
        raise ValueError(f"--in-memory supports the STFT audio pipelines, not {cfg.kind}")
    return cfg.n_fft // 2 + 1, 1 + int(round(cfg.clip_seconds * cfg.sample_rate)) // cfg.hop


def in_memory_datasets(dataset, audio_cfg, n_frames, size):
    facts = DATASETS[dataset]
    names = CREMAD_LABELS if dataset in ("cremad", "synthetic") else KS_CLASSES if dataset == "ks" else [
        f"class{i}" for i in range(facts["num_classes"])]
    shapes = (spectrogram_shape(audio_cfg), (3, n_frames, size, size))
    return InMemoryClips(4096, *shapes, names, 0), InMemoryClips(256, *shapes, names, 1), names


def seed_worker(worker_id):
    """DataLoader workers: derive python/numpy seeds from the torch seed the loader's generator gave this worker."""
    s = torch.initial_seed() % 2**32
    random.seed(s)
    np.random.seed(s)


def make_loaders(train_set, test_set, batch_size, num_workers, generator, pin_memory="auto", persistent_workers=False):
    """Training loader shuffled by `generator` (reseed it each epoch for exact resume), drop_last; full test loader.

    Under torchrun `batch_size` is the global batch: each process loads batch_size / world of its shard
    (common/distributed.py). pin_memory "auto" pins with CUDA; the test loader keeps its workers between epochs
    (deterministic transforms), the training loader only with persistent_workers (worker seeds are then drawn once).
    """
    world = distributed.world_size()
    if batch_size % world:
        raise SystemExit(f"--batch-size {batch_size} (the global batch) must be divisible by the {world} processes")
    batch_size //= world
    train_sampler, test_sampler = distributed.samplers(train_set, test_set)
    pin = torch.cuda.is_available() if pin_memory == "auto" else pin_memory in ("on", True)
    kw = dict(num_workers=num_workers, worker_init_fn=seed_worker, pin_memory=pin)
    n_train = len(train_sampler) if train_sampler is not None else len(train_set)
    train = torch.utils.data.DataLoader(train_set, batch_size, shuffle=train_sampler is None, sampler=train_sampler,
                                        drop_last=n_train > batch_size, generator=generator,
                                        persistent_workers=persistent_workers and num_workers > 0, **kw)
    test = torch.utils.data.DataLoader(test_set, batch_size, shuffle=False, sampler=test_sampler, drop_last=False,
                                       persistent_workers=num_workers > 0, **kw)
    return train, test
