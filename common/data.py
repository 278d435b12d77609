"""Audio-visual datasets: CREMA-D, Kinetics-Sounds, VGGSound and the synthetic CREMA-D-layout set (docs/data.md).

Every dataset yields `(spec (F, T) float32, frames (3, T_f, H, W) float32, label int64)`.
Audio and frames are paired by clip id, never by position; frames come from a *sorted* listing
(random within equal segments when training, the segment middles at test); the test-time audio
window is deterministic.
"""

import os
import random
import sys
import warnings
from dataclasses import replace

import numpy as np
import torch
from PIL import Image

from common import distributed
from common.audio import AUDIO_PIPELINES, AudioConfig, AudioPipeline, LogSpectrogram, read_wav
from common.cache import check_cache, check_entry
from common.frames import FrameConfig, FrameTransform, list_frames, load_frame, load_image, select_frames
from common.in_memory import in_memory_datasets
from common.splits import CREMAD_LABELS, KS_CLASSES, SkippedClipsWarning, cremad_clips, flat_clips
from common.synthetic import ensure_synthetic


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


class AVDataset(torch.utils.data.Dataset):
    """Clips already paired by id; returns (spec (F, T), frames (3, T_f, H, W), label).

    `audio_cache` / `frame_cache`: folders written by `python -m preprocess.cache` (--cache, set by `use_cache`); the
    spectrogram is then read from `<audio_cache>/<id>.npy`, the frames from the rows of `<frame_cache>/<id>.npy`.
    A clip that fails to load is replaced by the next one that loads (`load_failures` counts the failures per clip,
    in shared memory, so DataLoader workers count into the main process).
    """

    def __init__(
        self,
        clips,
        audio_cfg: AudioConfig,
        frame_cfg: FrameConfig,
        train: bool,
        class_names=None,
        audio_cache=None,
        frame_cache=None,
    ):
        self.clips, self.train, self.class_names = clips, train, class_names
        self.audio, self.frame_cfg, self.frames_tf = AudioPipeline(audio_cfg), frame_cfg, FrameTransform(frame_cfg)
        self.audio_cache, self.frame_cache = audio_cache, frame_cache
        self.skipped = {}  # reason -> list of clip ids, filled by the index builders

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
            warnings.warn(
                f"--cache: skipped {len(drop)} of {len(self.clips)} {'training' if self.train else 'test'} "
                f"clips ({parts}); re-run `python -m preprocess.cache` with the same flags to rewrite them",
                SkippedClipsWarning,
                stacklevel=3,
            )
            if len(drop) == len(self.clips):
                raise SystemExit(
                    f"--cache: every entry of the {'training' if self.train else 'test'} clips is "
                    "damaged; delete the cache folders and run `python -m preprocess.cache` again"
                )
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
                warnings.warn(
                    f"clip {self._clips[j].clip_id} failed to load ({err}); replaced by the next clip",
                    LoadFailedWarning,
                    stacklevel=2,
                )
        raise AllClipsFailedError(
            f"all {n} {'training' if self.train else 'test'} clips failed to load (first: "
            f"{first}); check the dataset files and the image/audio libraries"
        )

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


# dataset name -> facts and default loader parameters (docs/data.md), one row each. vggsound: the class list is the
# data folder's classes.txt; synthetic: written on first use
FIELDS = ("num_classes", "n_frames", "frame_size", "audio", "subdir", "num_workers", "layout", "classes", "prepare")
ROWS = {
    "cremad": (6, 1, 224, "cremad", "cremad", 4, "cremad", CREMAD_LABELS, "python -m preprocess.cremad"),
    "ks": (31, 3, 224, "stft16k", "kinetics_sounds", 4, "flat", KS_CLASSES, "python -m preprocess.kinetics_sounds"),
    "vggsound": (309, 3, 224, "stft16k", "vggsound", 4, "flat", None, "python -m preprocess.vggsound"),
    "synthetic": (6, 1, 32, "synthetic", "synthetic", 0, "cremad", CREMAD_LABELS, None),
}
DATASETS = {name: dict(zip(FIELDS, row, strict=True)) for name, row in ROWS.items()}


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
        if distributed.is_main():
            print(
                f"note: --num-workers {args.num_workers} is more than the {cpus} CPUs this process may use; "
                "loading may be slower",
                file=sys.stderr,
            )
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
        names = facts["classes"] or [f"class{i}" for i in range(facts["num_classes"])]
        return in_memory_datasets(names, audio_cfg, n_frames, size, getattr(args, "legacy_loader", False))
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
            index = "recheck" if args.recheck_clips else "use"  # the clip index (clip_index.py)
            if facts["layout"] == "cremad":
                clips, skipped = cremad_clips(root, split, n_frames, prepare=facts["prepare"], index=index)
                classes = facts["classes"]
            else:
                clips, skipped, classes = flat_clips(
                    root, split, n_frames, args.dataset, facts["classes"], prepare=facts["prepare"], index=index
                )
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


def seed_worker(worker_id):
    """DataLoader workers: derive python/numpy seeds from the torch seed the loader's generator gave this worker."""
    s = torch.initial_seed() % 2**32
    random.seed(s)
    np.random.seed(s)


def make_loaders(train_set, test_set, args, generator):
    """Training loader shuffled by `generator` (reseed it each epoch with `seed_epoch` for an exact resume), drop_last;
    the full test loader. Reads --batch-size, --num-workers, --pin-memory and --persistent-workers.

    Under torchrun --batch-size is the global batch: each process loads batch_size / world of its shard
    (common/distributed.py). pin_memory "auto" pins with CUDA; the test loader keeps its workers between epochs
    (deterministic transforms), the training loader only with --persistent-workers (worker seeds are then drawn once).
    """
    world, batch_size, num_workers = distributed.world_size(), args.batch_size, args.num_workers
    if batch_size % world:
        raise SystemExit(f"--batch-size {batch_size} (the global batch) must be divisible by the {world} processes")
    batch_size //= world
    train_sampler, test_sampler = distributed.samplers(train_set, test_set)
    pin = torch.cuda.is_available() if args.pin_memory == "auto" else args.pin_memory in ("on", True)
    kw = dict(num_workers=num_workers, worker_init_fn=seed_worker, pin_memory=pin)
    n_train = len(train_sampler) if train_sampler is not None else len(train_set)
    train = torch.utils.data.DataLoader(
        train_set,
        batch_size,
        shuffle=train_sampler is None,
        sampler=train_sampler,
        drop_last=n_train > batch_size,
        generator=generator,
        persistent_workers=args.persistent_workers and num_workers > 0,
        **kw,
    )
    test = torch.utils.data.DataLoader(
        test_set,
        batch_size,
        shuffle=False,
        sampler=test_sampler,
        drop_last=False,
        persistent_workers=num_workers > 0,
        **kw,
    )
    return train, test


def seed_epoch(loader, seed):
    """Seed the training loader for one epoch: its shuffle and the augmentation streams of its workers come from
    `seed` alone, so an epoch depends only on (seed, epoch) and --resume is exact. Under torchrun every process gets
    the same shuffle (the sampler's epoch) and its own shard, and its own augmentation stream (seed, rank): the
    loader's generator and the process's global torch, random and numpy generators (the augmentation of 0 workers)
    are reseeded with it."""
    loader.generator.manual_seed(seed)
    if not distributed.active():
        return
    loader.sampler.set_epoch(seed)
    own = seed * 1_000_003 + distributed.rank()
    loader.generator.manual_seed(own)
    torch.manual_seed(own)
    random.seed(own)
    np.random.seed(own % 2**32)
