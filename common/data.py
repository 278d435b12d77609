"""Audio-visual datasets: CREMA-D, Kinetics-Sounds, VGGSound and the synthetic CREMA-D-layout set (docs/data.md).

Every dataset yields `(spec (F, T) float32, frames (3, T_f, H, W) float32, label int64)`.
Audio and frames are paired by clip id, never by position; frames come from a *sorted* listing
(random within equal segments when training, the segment middles at test); the test-time audio
window is deterministic.
"""

import fcntl
import json
import os
import random
import shutil
import sys
import warnings
import weakref
from dataclasses import replace

import numpy as np
import torch
from PIL import Image

from common import distributed
from common.audio import AUDIO_PIPELINES, AudioConfig, AudioPipeline, LogSpectrogram, read_wav
from common.cache import check_cache, check_entry
from common.frames import FrameConfig, FrameTransform, list_frames, load_frame, load_image, select_frames
from common.splits import (
    CREMAD_LABELS,
    KS_CLASSES,
    Clip,
    SkippedClipsWarning,
    cremad_clips,
    flat_clips,
)


# ---------------------------------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------------------------------
class LoadFailedWarning(UserWarning):
    """A clip that passed the start-up check failed to load and was replaced by the next clip (docs/data.md)."""


class AllClipsFailedError(SystemExit, Exception):
    """Every clip of a split failed to load: a one-line exit, also from a DataLoader worker. It is an Exception so
    the worker hands it to the main process, and a SystemExit there so the script exits without a traceback."""

    def __init__(self, msg):
        if "\n" in msg:  # re-raised by the DataLoader as type(e)(its text + the worker's traceback): keep our line
            msg = msg.rstrip().splitlines()[-1].split(": ", 1)[-1]
        super().__init__(msg)


_LIVE = weakref.WeakSet()  # every AVDataset of this process: runs.Run counts their failed loads per epoch


class AVDataset(torch.utils.data.Dataset):
    """Clips already paired by id; returns (spec (F, T), frames (3, T_f, H, W), label).

    `audio_cache` / `frame_cache`: folders written by `python -m preprocess.cache` (--cache, set by `use_cache`); the
    spectrogram is then read from `<audio_cache>/<id>.npy`, the frames from the rows of `<frame_cache>/<id>.npy`.
    A clip that fails to load is replaced by the next one that loads (`load_failures` counts the failures per clip,
    in shared memory, so DataLoader workers count into the main process).
    """

    def __init__(self, clips, audio_cfg: AudioConfig, frame_cfg: FrameConfig, train: bool, class_names=None,
                 audio_cache=None, frame_cache=None):
        self.clips, self.train, self.class_names = clips, train, class_names
        self.audio, self.frame_cfg, self.frames_tf = AudioPipeline(audio_cfg), frame_cfg, FrameTransform(frame_cfg)
        self.audio_cache, self.frame_cache = audio_cache, frame_cache
        self.skipped = {}  # reason -> list of clip ids, filled by the index builders
        _LIVE.add(self)

    @property
    def stft_in_model(self):
        """True when the model computes the spectrogram: the current loader with an STFT pipeline hands over the
        waveform window (--legacy-loader and the other pipelines hand over the spectrogram)."""
        return not self.frame_cfg.legacy and self.audio.cfg.kind == "stft"

    @property
    def frontend(self):
        """A new audio front-end for the model to run on its device (common/models.py AudioEncoder), or None: with
        `stft_in_model` and no cached spectrograms the model computes the log spectrogram, once per batch."""
        if self.audio_cache or not self.stft_in_model:
            return None
        return LogSpectrogram(self.audio.cfg.n_fft, self.audio.cfg.hop)

    @property
    def clips(self):
        return self._clips

    @clips.setter
    def clips(self, clips):
        self._clips = list(clips)
        # created before any worker starts: workers (forked or spawned) add to the same memory the main process reads
        self.load_failures = torch.zeros(len(self._clips), dtype=torch.int32).share_memory_()

    def use_cache(self, audio_cache, frame_cache):
        """Read from the cache folders (entries checked present by common/cache.py check_cache); clips whose entries
        fail the header check (check_entry) are dropped, counted in one SkippedClipsWarning."""
        bad, n_frames = {}, self.frame_cfg.n_frames
        for c in self.clips:
            for kind, folder in (("audio", audio_cache), ("frames", frame_cache)):
                problem = folder and check_entry(os.path.join(folder, f"{c.clip_id}.npy"), kind, n_frames)
                if problem:
                    bad.setdefault(problem, []).append(c.clip_id)
                    break
        if bad:
            drop = {i for ids in bad.values() for i in ids}
            parts = "; ".join(f"{k}: {len(v)} (first: {', '.join(v[:3])})" for k, v in bad.items())
            warnings.warn(f"--cache: skipped {len(drop)} of {len(self.clips)} {'training' if self.train else 'test'} "
                          f"clips ({parts}); re-run `python -m preprocess.cache` with the same flags to rewrite them",
                          SkippedClipsWarning, stacklevel=3)
            if len(drop) == len(self.clips):
                raise SystemExit(f"--cache: every entry of the {'training' if self.train else 'test'} clips is "
                                 "damaged; delete the cache folders and run `python -m preprocess.cache` again")
            self.clips = [c for c in self.clips if c.clip_id not in drop]
            for k, v in bad.items():
                self.skipped.setdefault(k, []).extend(v)
        self.audio_cache, self.frame_cache = audio_cache, frame_cache

    def __len__(self):
        return len(self._clips)

    def __getitem__(self, i):
        """Clip i, or, if it fails to load, the next clip (i + 1, i + 2, ... wrapping) that loads: a deterministic
        choice, so runs stay reproducible. Each failure is counted in `load_failures` and warned once per process."""
        n, first = len(self._clips), None
        for k in range(n):
            j = (i + k) % n
            try:
                return self.load(j)
            except Exception as e:  # any failure of this clip's files; a bug would fail every clip (below)
                self.load_failures[j] += 1
                err = " ".join(f"{type(e).__name__}: {e}".split())
                first = first or f"{self._clips[j].clip_id}: {err}"
                warnings.warn(f"clip {self._clips[j].clip_id} failed to load ({err}); replaced by the next clip",
                              LoadFailedWarning, stacklevel=2)
        raise AllClipsFailedError(f"all {n} {'training' if self.train else 'test'} clips failed to load (first: "
                                  f"{first}); check the dataset files and the image/audio libraries")

    def load(self, i):
        """Clip i as (spec, frames, label); raises whatever reading its files raises."""
        c = self._clips[i]
        spec = self.load_audio(c)  # first: the random draws (audio window, frames, crops) keep their order
        return spec, self.frames_tf(self.load_frames(c), self.train), torch.tensor(c.label, dtype=torch.long)

    def load_audio(self, c):
        """The clip's spectrogram from the cache or computed from its wav, or, with a `frontend`, the waveform window
        the model turns into the spectrogram."""
        if self.audio_cache:
            return torch.from_numpy(np.load(os.path.join(self.audio_cache, f"{c.clip_id}.npy")))
        samples, sr = read_wav(c.wav)
        if self.stft_in_model:
            return self.audio.waveform(samples, sr, self.train)
        return self.audio(samples, sr, self.train)

    def load_frames(self, c):
        """The clip's selected frames, decoded: (H, W, 3) uint8 arrays (PIL images for the previous loader)."""
        legacy = self.frame_cfg.legacy
        if self.frame_cache:  # (n_frames_on_disk, H, W, 3) uint8; mmap reads only the selected rows
            rows = np.load(os.path.join(self.frame_cache, f"{c.clip_id}.npy"), mmap_mode="r")
            idx = select_frames(len(rows), self.frame_cfg.n_frames, self.train, self.frame_cfg.select)
            return [Image.fromarray(np.array(rows[k])) if legacy else np.array(rows[k]) for k in idx]
        names = list_frames(c.frame_dir)
        idx = select_frames(len(names), self.frame_cfg.n_frames, self.train, self.frame_cfg.select)
        return [(load_image if legacy else load_frame)(os.path.join(c.frame_dir, names[k])) for k in idx]


def load_failure_counts():
    """{dataset: its per-clip failed-load counts so far} for every AVDataset of this process (runs.Run, per epoch)."""
    return {ds: ds.load_failures.clone() for ds in list(_LIVE)}


def load_failures_since(before):
    """(failed loads since the `load_failure_counts()` snapshot `before`, ids of the clips that failed)."""
    n, ids = 0, []
    for ds in list(_LIVE):
        now, old = ds.load_failures, before.get(ds)
        delta = now - old if old is not None and old.shape == now.shape else now
        n += int(delta.sum())
        ids += [ds.clips[k].clip_id for k in delta.nonzero().flatten().tolist()]
    return n, ids


# dataset name -> facts and default loader parameters (docs/data.md)
DATASETS = {
    "cremad": dict(num_classes=6, n_frames=1, frame_size=224, audio="cremad", subdir="cremad", num_workers=4,
                   layout="cremad", classes=CREMAD_LABELS, prepare="python -m preprocess.cremad"),
    "ks": dict(num_classes=31, n_frames=3, frame_size=224, audio="stft16k", subdir="kinetics_sounds", num_workers=4,
               layout="flat", classes=KS_CLASSES, prepare="python -m preprocess.kinetics_sounds"),
    "vggsound": dict(num_classes=309, n_frames=3, frame_size=224, audio="stft16k", subdir="vggsound", num_workers=4,
                     layout="flat", classes=None, prepare="python -m preprocess.vggsound"),  # classes: classes.txt
    "synthetic": dict(num_classes=6, n_frames=1, frame_size=32, audio="synthetic", subdir="synthetic", num_workers=0,
                      layout="cremad", classes=CREMAD_LABELS, prepare=None),  # written on first use
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
    g.add_argument("--legacy-loader", action="store_true",
                   help="the previous loader: torchaudio resampling, PIL frames normalised in the worker "
                   "(docs/data.md)")
    g.add_argument("--recheck-clips", action="store_true",
                   help="check every file of every clip at start-up and rewrite the clip index (docs/data.md)")
    g.add_argument(
        "--in-memory",
        action="store_true",
        help="benchmarks: random in-memory tensors at the dataset's input sizes instead of its files (no data loading)",
    )
    return parser


_READ_LOCKS = {}  # root -> open lock file, held (shared) for the life of the process: "this set is being read"


def ensure_synthetic(root, params=None):
    """Generate the default synthetic set on first use, or again if it was written with other generator defaults.
    With `params` (all generator arguments, e.g. common.synthetic.regime_args): that set instead, regenerated
    whenever the folder holds another one.

    Safe when several processes start together (torchrun, two run_all.sh jobs): one generates, the others wait for
    it (an exclusive lock on `<root>.lock`). Every process then holds a shared lock on `<root>.readers` for its
    lifetime, and a set is only replaced when nobody holds it: a set another run is reading is never deleted.
    The new set is written to a temporary folder and renamed into place, so nobody reads a half-written set.
    """
    from common.synthetic import DEFAULTS, generate

    os.makedirs(os.path.dirname(os.path.abspath(root)), exist_ok=True)
    with open(f"{root}.lock", "a") as gen_lock:
        fcntl.flock(gen_lock, fcntl.LOCK_EX)  # waits while another process generates; released when the block ends
        readers = _READ_LOCKS.get(root) or open(f"{root}.readers", "a")
        meta_path = os.path.join(root, "meta.json")
        meta = None
        if os.path.isfile(meta_path):
            with open(meta_path) as f:
                meta = json.load(f)
        if params is not None:
            ok = meta is not None and {k: v for k, v in meta.items() if k != "custom"} == params
        else:
            ok = meta is not None and (meta.get("custom") or meta == DEFAULTS)
        if not ok:
            if meta is not None:
                try:  # replace the set only if no other process is reading it
                    fcntl.flock(readers, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise SystemExit(f"error: {root} was written with other generator settings and another run is "
                                     "reading it; wait for that run to end, or pass another --data-root") from None
                print(f"{root} was written with other generator settings; regenerating it")
            else:
                print(f"generating the synthetic dataset in {root} (first use)")
            tmp = f"{root}.tmp{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            generate(tmp, **(params or {}))
            if os.path.isdir(root):
                old = f"{root}.old{os.getpid()}"
                os.rename(root, old)
                shutil.rmtree(old)
            os.rename(tmp, root)
        fcntl.flock(readers, fcntl.LOCK_SH)  # this process reads the set from now on
        _READ_LOCKS[root] = readers


def audio_config(args):
    """(pipeline name, AudioConfig) of the data flags: --audio-pipeline or the dataset's, with --audio-seconds
    applied."""
    name = args.audio_pipeline or DATASETS[args.dataset]["audio"]
    cfg = AUDIO_PIPELINES[name]
    if getattr(args, "legacy_loader", False):
        cfg = replace(cfg, resampler="torchaudio")
    if args.audio_seconds:
        cfg = replace(cfg, clip_seconds=args.audio_seconds, tile_seconds=max(cfg.tile_seconds, args.audio_seconds))
    return name, cfg


def usable_cpus():
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def build_datasets(args):
    """(train_set, test_set, class_names) for args.dataset, with the loader flags resolved to per-dataset defaults."""
    facts = DATASETS[args.dataset]
    cpus = usable_cpus()
    if getattr(args, "num_workers", None) is None:  # the table's default, capped at the CPUs this process may use
        args.num_workers = min(facts["num_workers"], cpus)
    elif args.num_workers > cpus:  # kept as given, said once here instead of PyTorch's warnings at every loader
        warnings.filterwarnings("ignore", "This DataLoader will create", UserWarning)
        print(f"note: --num-workers {args.num_workers} is more than the {cpus} CPUs this process may use; "
              "loading may be slower", file=sys.stderr)
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
        getattr(args, "legacy_loader", False),
    )
    if getattr(args, "in_memory", False):
        return in_memory_datasets(args.dataset, audio_cfg, n_frames, size, getattr(args, "legacy_loader", False))
    root = os.path.join(args.data_root, facts["subdir"])
    sets = []
    try:  # a missing root, split file or clips, a malformed split row: one line naming the path (common/cli.py)
        if args.dataset == "synthetic":  # under torchrun rank 0 writes it first, the other processes wait for it
            if distributed.is_main():
                ensure_synthetic(root)
            distributed.barrier()
            if not distributed.is_main():
                ensure_synthetic(root)  # the set is there now: this takes the readers' lock
        for split, train in (("train", True), ("test", False)):
            index = "recheck" if getattr(args, "recheck_clips", False) else "use"  # the clip index (clip_index.py)
            if facts["layout"] == "cremad":
                clips, skipped = cremad_clips(root, split, n_frames, prepare=facts["prepare"], index=index)
                classes = facts["classes"]
            else:
                clips, skipped, classes = flat_clips(root, split, n_frames, args.dataset, facts["classes"],
                                                     prepare=facts["prepare"], index=index)
            ds = AVDataset(clips, audio_cfg, frame_cfg, train, classes)
            ds.skipped = skipped
            sets.append(ds)
    except (OSError, ValueError) as e:
        raise SystemExit(str(e)) from None
    if getattr(args, "cache", False):
        audio_dir, frames_dir = check_cache(args, root, audio_name, audio_cfg, sets[0].clips + sets[1].clips)
        for ds in sets:
            ds.use_cache(audio_dir, frames_dir)
    return sets[0], sets[1], sets[0].class_names


class InMemoryClips(torch.utils.data.Dataset):
    """`n` clips of random tensors of the given shapes (a pool of 8, repeated) with random labels: the model step
    without any data loading, at a dataset's real input sizes (preprocess/benchmark.py, --in-memory). With a
    `frontend` the audio is a waveform window, as the current loader gives it, so the model step includes the
    spectrogram the model computes."""

    def __init__(self, n, audio_shape, frames_shape, class_names, seed, frontend=None):
        g = torch.Generator().manual_seed(seed)
        self.spec = torch.randn(8, *audio_shape, generator=g) * (0.1 if frontend is not None else 1.0)
        self.frames = torch.randint(0, 256, (8, *frames_shape), dtype=torch.uint8, generator=g)  # as the loader's
        self.labels = torch.randint(len(class_names), (n,), generator=g)
        self.clips = [Clip(str(i), "", "", int(y)) for i, y in enumerate(self.labels)]
        self.class_names, self.skipped, self.frontend = class_names, {}, frontend

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.spec[i % 8], self.frames[i % 8], self.labels[i]


def spectrogram_shape(cfg: AudioConfig):
    """(F, T) of an STFT pipeline: n_fft // 2 + 1 bins, 1 + samples // hop centred frames (CREMA-D 257 x 188)."""
    if cfg.kind != "stft":
        raise ValueError(f"--in-memory supports the STFT audio pipelines, not {cfg.kind}")
    return cfg.n_fft // 2 + 1, 1 + cfg.window_length // cfg.hop


def in_memory_datasets(dataset, audio_cfg, n_frames, size, legacy=False):
    """Random clips at the dataset's sizes: waveform windows and the front-end (the current loader), or
    spectrograms (--legacy-loader)."""
    facts = DATASETS[dataset]
    names = CREMAD_LABELS if dataset in ("cremad", "synthetic") else KS_CLASSES if dataset == "ks" else [
        f"class{i}" for i in range(facts["num_classes"])]
    spec = spectrogram_shape(audio_cfg)
    frontend = None if legacy else LogSpectrogram(audio_cfg.n_fft, audio_cfg.hop)
    audio = spec if legacy else (audio_cfg.window_length,)
    shapes = (audio, (3, n_frames, size, size))
    return (InMemoryClips(4096, *shapes, names, 0, frontend), InMemoryClips(256, *shapes, names, 1, frontend),
            names)


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
