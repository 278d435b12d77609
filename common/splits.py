"""Split indexing: the class lists, the split files of each layout (CREMA-D, flat) and the clips they name,
paired by id and checked on disk (file headers only, nothing decoded); a skipped clip is counted in one warning
(docs/data.md)."""

import csv
import os
import warnings
from dataclasses import dataclass

from common import clip_index

CREMAD_LABELS = ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"]  # fixed order (docs/data.md)
KS_CLASSES = [
    "blowing_nose",
    "blowing_out_candles",
    "bowling",
    "chopping_wood",
    "dribbling_basketball",
    "laughing",
    "mowing_lawn",
    "playing_accordion",
    "playing_bagpipes",
    "playing_bass_guitar",
    "playing_clarinet",
    "playing_drums",
    "playing_guitar",
    "playing_harmonica",
    "playing_keyboard",
    "playing_organ",
    "playing_piano",
    "playing_saxophone",
    "playing_trombone",
    "playing_trumpet",
    "playing_violin",
    "playing_xylophone",
    "ripping_paper",
    "shoveling_snow",
    "shuffling_cards",
    "singing",
    "stomping_grapes",
    "tap_dancing",
    "tapping_guitar",
    "tapping_pen",
    "tickling",
]  # alphabetical, label index = position (docs/data.md)


class SkippedClipsWarning(UserWarning):
    """Raised (as a warning) when clips named by a split file are dropped; the message counts them."""


@dataclass(frozen=True)
class Clip:
    clip_id: str
    wav: str
    frame_dir: str
    label: int


def read_rows(path):
    """Rows of a header-less CSV/TXT split file: BOM stripped, CRLF or LF, blank lines ignored."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"split file {path} not found; run the preprocess step or pass --data-root")
    with open(path, newline="", encoding="utf-8-sig") as f, clip_index.gc_paused():  # (start-up at 200k rows)
        stripped = ((n, [x.strip() for x in row]) for n, row in enumerate(csv.reader(f), 1))
        return [(n, row) for n, row in stripped if any(row)]  # each field stripped once


def index_clips(rows, split_path, label_of, wav_of, frames_of, n_frames, index=None, mode="use"):
    """Pair audio and frames by clip id; drop (with one warning counting each reason) clips whose files are missing,
    short, or fail the start-up check of their headers (common/clip_index.py check_clip), found through the clip
    index at `index` (None: every clip's files checked; `mode`: common/clip_index.py clip_facts)."""
    with clip_index.gc_paused():  # a million small objects at 200k clips (docs/data.md, "The clip index")
        labelled = [label_of(line, row) for line, row in rows]  # every row's label, before any file is looked at
        paths = {c: (wav_of(c), frames_of(c)) for c, _ in labelled}
        facts = clip_index.clip_facts(index, paths, (wav_of("\0"), frames_of("\0")), mode)
        clips, skipped, seen = [], {}, set()
        for clip_id, label in labelled:
            if clip_id in seen:
                skipped.setdefault("duplicate row", []).append(clip_id)
                continue
            seen.add(clip_id)
            problem, n_found, frame_problem = facts[clip_id]
            problem = problem or (f"fewer than {n_frames} frames" if n_found < n_frames else frame_problem)
            if problem:
                skipped.setdefault(problem, []).append(clip_id)
                continue
            wav, frame_dir = paths[clip_id]
            wav_name = os.path.splitext(os.path.basename(wav))[0]
            assert wav_name == os.path.basename(os.path.normpath(frame_dir)) == clip_id
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


def _check_root(root, prepare=None):
    if not os.path.isdir(root):
        how = f"prepare it with `{prepare} ...` (see README)" if prepare else "check the path"
        raise FileNotFoundError(f"dataset root {root} not found; {how} or pass --data-root")


def cremad_clips(root, split, n_frames, fps=1, prepare="python -m preprocess.cremad", index="use"):
    """CREMA-D layout (docs/data.md): AudioWAV/<id>.wav, Image-01-FPS/<id>/*.jpg, {train,test}.csv rows `<id>,<EMO>`.
    `index`: the clip index <root>/clip_index.<split>.json, "use" (default), "recheck" or "off" (clip_index.py)."""
    _check_root(root, prepare)
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

    return index_clips(
        rows,
        split_path,
        label_of,
        lambda c: os.path.join(root, "AudioWAV", f"{c}.wav"),
        lambda c: os.path.join(root, f"Image-{fps:02d}-FPS", c),
        n_frames,
        clip_index.index_path(root, split),
        index,
    )


def read_classes(path):
    with open(path, encoding="utf-8-sig") as f:
        return [line.strip() for line in f if line.strip()]


def flat_clips(root, split, n_frames, dataset, default_classes=None, prepare=None, index="use"):
    """Flat layout (docs/data.md), used for Kinetics-Sounds and VGGSound.

    <root>/classes.txt, <root>/audio/<id>.wav, <root>/frames/<id>/*.jpg and one split file, tried in order:
    splits/{split}.csv (`<id>,<label>`), my_{split}.txt (the official KS rows `<id>,10,<label>`), or, for VGGSound,
    the official vggsound.csv (`<ytid>,<start>,<label text>,<split>`, labels sorted alphabetically).
    Labels may be indices or class names. `index`: the clip index, as in cremad_clips.
    """
    _check_root(root, prepare)
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

    clips, skipped = index_clips(
        rows,
        split_path,
        label_of,
        lambda c: os.path.join(root, "audio", f"{c}.wav"),
        lambda c: os.path.join(root, "frames", c),
        n_frames,
        clip_index.index_path(root, split),
        index,
    )
    return clips, skipped, classes
