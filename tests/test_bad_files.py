"""Bad files (docs/data.md, "Bad files"): a wav or frame file that fails the start-up header check skips its clip
with a counted warning; a clip that passes it but fails to load is replaced by the next clip and counted, also from
DataLoader workers and in a script's metrics.jsonl; a damaged cache entry skips its clip; every clip failing is a
one-line exit."""

import argparse
import contextlib
import json
import os
import wave

import numpy as np
import pytest
import torch
from conftest import run_script

from common.audio import check_wav, read_wav
from common.data import AllClipsFailedError, LoadFailedWarning, build_datasets
from common.flags import add_data_args
from common.frames import check_image, list_frames
from common.splits import SkippedClipsWarning
from common.synthetic import generate
from preprocess import cache

BAD_BODY = b"\xff\xd8" + bytes(range(256)) * 4 + b"\xff\xd9"  # JPEG start and end markers around garbage


def data_args(root, **kw):
    args = add_data_args(argparse.ArgumentParser()).parse_args(["--dataset", "synthetic", "--data-root", str(root)])
    for k, v in kw.items():
        setattr(args, k, v)
    return args


@pytest.fixture
def data(tmp_path):
    """A --data-root with synthetic/ of 6 train and 4 test clips (2-3 frames each)."""
    generate(str(tmp_path / "synthetic"), n_train=6, n_test=4)
    return tmp_path


def split_ids(root, split):
    return [line.split(",")[0] for line in (root / "synthetic" / f"{split}.csv").read_text().splitlines()]


def frame_paths(root, clip_id):
    fdir = root / "synthetic" / "Image-01-FPS" / clip_id
    return [fdir / n for n in list_frames(str(fdir))]


def cut(path, n_bytes):
    data = path.read_bytes()
    path.write_bytes(data[:n_bytes])


def ids(ds):
    return [c.clip_id for c in ds.clips]


# ---- start-up check: skipped, counted --------------------------------------------------------------------------
def test_truncated_wav_is_skipped_with_a_counted_warning(data):
    victim = split_ids(data, "train")[2]
    wav = data / "synthetic" / "AudioWAV" / f"{victim}.wav"
    cut(wav, 100)
    with wave.open(str(wav)) as w:  # the header still promises the full second, which the file no longer holds
        assert w.getnframes() == 16000
    assert len(read_wav(str(wav))[0]) == 28  # what the loader used to tile to a full window and train on
    assert check_wav(str(wav)) == "truncated wav"
    with pytest.warns(
        SkippedClipsWarning,
        match=rf"train.csv: skipped 1 of 6 clips \(truncated wav: 1 \(first: "
        rf"{victim}\)\)",
    ):
        train, test, _ = build_datasets(data_args(data))
    assert victim not in ids(train) and len(train) == 5 and train.skipped == {"truncated wav": [victim]}
    assert len(test) == 4 and test.skipped == {}


def test_wav_headers(tmp_path, data):
    good = data / "synthetic" / "AudioWAV" / f"{split_ids(data, 'train')[0]}.wav"
    assert check_wav(str(good)) is None
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "junk.wav").write_bytes(b"RIFF\x00\x00\x00\x00JUNK")
    trailing = tmp_path / "trailing.wav"  # extra bytes after the data chunk (a LIST chunk, say) are fine
    trailing.write_bytes(good.read_bytes() + b"LIST\x04\x00\x00\x00abcd")
    assert [check_wav(str(tmp_path / n)) for n in ("empty.wav", "junk.wav", "trailing.wav")] == [
        "empty wav",
        "unreadable wav",
        None,
    ]


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda p: p.write_bytes(b"not a JPEG at all " * 40), "corrupt frame"),  # garbage bytes with a .jpg name
        (lambda p: p.write_bytes(b""), "empty frame file"),
        (lambda p: cut(p, p.stat().st_size // 2), "truncated frame"),  # JPEG start marker, no end marker
    ],
)
def test_bad_frame_among_good_ones_is_skipped(data, damage, reason):
    train_ids = split_ids(data, "train")
    victim = next(c for c in train_ids if len(frame_paths(data, c)) >= 2)
    bad, *good = frame_paths(data, victim)[::-1]  # the last frame: one the test split never draws
    damage(bad)
    assert check_image(str(bad)) == reason and all(check_image(str(p)) is None for p in good)
    with pytest.warns(SkippedClipsWarning, match=rf"skipped 1 of 6 clips \({reason}: 1 \(first: {victim}\)\)"):
        train, _, _ = build_datasets(data_args(data))
    assert ids(train) == [c for c in train_ids if c != victim]


def test_several_reasons_are_counted_in_one_line(data):
    a, b, c = split_ids(data, "test")[:3]
    cut(data / "synthetic" / "AudioWAV" / f"{a}.wav", 100)
    cut(data / "synthetic" / "AudioWAV" / f"{b}.wav", 1000)
    frame_paths(data, c)[0].write_bytes(b"")
    with pytest.warns(SkippedClipsWarning) as record:
        _, test, _ = build_datasets(data_args(data))
    (line,) = [str(w.message) for w in record if "test.csv" in str(w.message)]
    assert line.endswith(
        f"test.csv: skipped 3 of 4 clips (truncated wav: 2 (first: {a}, {b}); empty frame file: 1 (first: {c}))"
    )
    assert len(test) == 1


# ---- load time: replaced by the next clip, counted -------------------------------------------------------------
def break_clip(root, clip_id):
    """Every frame of the clip passes the header check but does not decode."""
    for p in frame_paths(root, clip_id):
        p.write_bytes(BAD_BODY)
        assert check_image(str(p)) is None


@pytest.mark.parametrize("num_workers", [0, 1])
def test_frame_failing_to_decode_is_replaced_by_the_next_clip_and_counted(data, num_workers):
    _, clean, _ = build_datasets(data_args(data))
    expected = [clean[i] for i in range(len(clean))]
    victim = 1
    break_clip(data, ids(clean)[victim])
    _, test, _ = build_datasets(data_args(data))  # passes the start-up check: nothing skipped
    assert ids(test) == ids(clean)
    loader = torch.utils.data.DataLoader(test, batch_size=2, num_workers=num_workers)
    with (
        pytest.warns(
            LoadFailedWarning,
            match=rf"clip {ids(test)[victim]} failed to load \(ValueError: .*\.jpg: "
            "unreadable image",
        )
        if num_workers == 0
        else contextlib.nullcontext()
    ):
        batches = list(loader)
    spec, frames, label = (torch.cat(x) for x in zip(*batches))
    want = [victim + 1 if i == victim else i for i in range(len(test))]  # the next clip, a deterministic choice
    assert torch.equal(label, torch.stack([expected[i][2] for i in want]))
    assert torch.equal(frames, torch.stack([expected[i][1] for i in want]))
    assert torch.equal(spec, torch.stack([expected[i][0] for i in want]))
    # counted in the main process, also from a worker (whose warnings stay in that process: its stderr)
    assert test.load_failures.tolist() == [0, 1, 0, 0]


def test_every_clip_failing_is_a_one_line_exit(data):
    for c in split_ids(data, "test"):
        break_clip(data, c)
    _, test, _ = build_datasets(data_args(data))
    for workers in (0, 1):
        warns = pytest.warns(LoadFailedWarning) if workers == 0 else contextlib.nullcontext()
        with pytest.raises(AllClipsFailedError) as e, warns:
            list(torch.utils.data.DataLoader(test, batch_size=2, num_workers=workers))
        msg = str(e.value)
        assert isinstance(e.value, SystemExit) and "\n" not in msg
        assert msg.startswith("all 4 test clips failed to load (first: ") and "unreadable image" in msg


# ---- the cache -------------------------------------------------------------------------------------------------
def test_damaged_cache_entry_is_skipped_and_rewritten(data):
    write = ["--dataset", "synthetic", "--data-root", str(data), "--workers", "1", "--frame-side", "24"]
    cache.main(write)
    folder = data / "synthetic" / "cache" / "frames-24"
    victim = split_ids(data, "train")[4]
    cut(folder / f"{victim}.npy", 200)  # the header promises (n, 24, 24, 3) bytes the file no longer holds
    with pytest.warns(
        SkippedClipsWarning,
        match=rf"--cache: skipped 1 of 6 training clips \(truncated cache entry: 1 "
        rf"\(first: {victim}\)\); re-run `python -m preprocess.cache`",
    ):
        train, test, _ = build_datasets(data_args(data, cache=True, cache_frame_side=24))
    assert victim not in ids(train) and len(train) == 5 and len(test) == 4
    assert train.skipped == {"truncated cache entry": [victim]}
    counts = cache.main(write)  # the cache step writes the damaged entry again
    assert counts["frames"] == {"written": 1, "present": 9, "failed": 0}
    assert np.load(folder / f"{victim}.npy").shape[1:] == (24, 24, 3)
    train, _, _ = build_datasets(data_args(data, cache=True, cache_frame_side=24))
    assert victim in ids(train)


# ---- end to end ------------------------------------------------------------------------------------------------
def test_baseline_run_with_broken_files_completes_and_logs_the_count(tmp_path):
    root = tmp_path / "data"
    generate(str(root / "synthetic"), n_train=9, n_test=4)
    skipped = split_ids(root, "train")[0]
    cut(root / "synthetic" / "AudioWAV" / f"{skipped}.wav", 100)  # skipped at start-up
    broken = split_ids(root, "test")[2]
    break_clip(root, broken)  # replaced at every evaluation (the test loader reads every clip)
    proc, run_dir = run_script(
        "baseline.py", root, tmp_path / "runs", *"--epochs 1 --max-steps 1 --num-workers 1".split()
    )
    assert f"train.csv: skipped 1 of 9 clips (truncated wav: 1 (first: {skipped}))" in proc.stderr
    assert f"clip {broken} failed to load" in proc.stderr  # from the worker
    assert f"epoch 0: replaced 1 clips that failed to load by the next clip (first: {broken})" in proc.stderr
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["data/replaced_clips"] for r in rows] == [1]
