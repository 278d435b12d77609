"""preprocess/cache.py and --cache: exact spectrograms, exact frames at side 0, resized frames with every frame in
sorted order, resumable and atomic writes, the one-line start-up errors, and a script run end to end."""

import argparse
import contextlib
import glob
import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import read_results, run_script
from PIL import Image

from common.data import build_datasets
from common.flags import add_data_args
from common.frames import list_frames, load_image
from common.synthetic import generate
from preprocess import cache


def data_args(root, **kw):
    args = add_data_args(argparse.ArgumentParser()).parse_args(["--dataset", "synthetic", "--data-root", str(root)])
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def write_cache(root, *extra, workers=2):
    return cache.main(["--dataset", "synthetic", "--data-root", str(root), "--workers", str(workers), *map(str, extra)])


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """A tiny synthetic set (24 train, 12 test clips, 40 px frames) with caches at frame sides 0 and 24."""
    root = tmp_path_factory.mktemp("cached")
    generate(str(root / "synthetic"), n_train=24, n_test=12)
    write_cache(root, "--frame-side", 0)
    write_cache(root, "--frame-side", 24)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def copy(cached, tmp_path):
    """A private copy of the cached set, for the tests that damage the cache."""
    shutil.copytree(cached, tmp_path / "data")
    return tmp_path / "data"


def model_input(ds, item):
    """An item as the model sees it: the waveform window through the set's front-end (the current loader, STFT
    pipelines, uncached), everything else as it is."""
    return (item[0] if ds.frontend is None else ds.frontend(item[0]), *item[1:])


@contextlib.contextmanager
def threads(n):
    """The reader's intra-op thread count for the block (the cache writer always uses one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("pipeline", ["synthetic", "cremad", "pkl1004", "fbank"])
def test_cached_spectrogram_equals_the_live_one(cached, pipeline):
    """Bitwise at the writer's thread count (one). At two threads the FFT may round differently (seen: STFT
    magnitudes 2e-7 apart, which log(|S| + 1e-7) turns into 1e-4 in near-silent bins): there the STFT pipelines'
    magnitudes |S| = exp(spec) agree to 1e-5 of the largest one, and the standardised pipelines (pkl1004, fbank)
    to 1e-5 of their largest value."""
    flags = [] if pipeline == "synthetic" else ["--audio-pipeline", pipeline]
    write_cache(cached, "--frame-side", 24, *flags)
    kw = {} if pipeline == "synthetic" else {"audio_pipeline": pipeline}
    live = build_datasets(data_args(cached, **kw))
    hit = build_datasets(data_args(cached, cache=True, cache_frame_side=24, **kw))
    for ds, dc in zip(live[:2], hit[:2]):
        assert dc.audio_cache is not None and len(ds) == len(dc)
        for i in range(len(ds)):
            b = dc[i][0]
            with threads(1):
                a = model_input(ds, ds[i])[0]
            assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b), (pipeline, ds.train, i)
            with threads(2):
                a2 = model_input(ds, ds[i])[0]
            if ds.audio.cfg.kind == "stft":  # compare |S|: the log magnifies rounding where |S| is near 0
                a2, b = a2.exp(), b.exp()
            assert (a2 - b).abs().max() <= 1e-5 * b.abs().max(), (pipeline, ds.train, i)


def test_side_0_items_equal_the_uncached_ones(cached):
    live = build_datasets(data_args(cached))
    hit = build_datasets(data_args(cached, cache=True, cache_frame_side=0))
    for ds, dc in zip(live[:2], hit[:2]):
        for i in (0, 5, len(ds) - 1):
            with threads(1):
                torch.manual_seed(i)
                a = model_input(ds, ds[i])
                torch.manual_seed(i)
                b = dc[i]
            assert all(torch.equal(x, y) for x, y in zip(a, b)), (ds.train, i)


def test_resized_frames_keep_every_frame_in_sorted_order(cached):
    train, test, _ = build_datasets(data_args(cached))
    for c in train.clips + test.clips:
        arr = np.load(os.path.join(cached, "synthetic", "cache", "frames-24", f"{c.clip_id}.npy"))
        names = list_frames(c.frame_dir)
        assert arr.dtype == np.uint8 and arr.shape == (len(names), 24, 24, 3)
        for k, n in enumerate(names):
            assert np.array_equal(
                arr[k], np.asarray(cache.resize_short_side(load_image(os.path.join(c.frame_dir, n)), 24))
            )
    assert cache.resize_short_side(Image.new("RGB", (60, 40)), 24).size == (36, 24)  # short side, aspect kept
    assert cache.resize_short_side(Image.new("RGB", (60, 40)), 256).size == (60, 40)  # never upscaled
    spec, frames, _ = build_datasets(data_args(cached, cache=True, cache_frame_side=24))[0][0]
    assert frames.shape == (3, 1, 32, 32)


def test_rerun_writes_nothing_and_a_failed_write_leaves_no_entry(copy, monkeypatch):
    folder = os.path.join(copy, "synthetic", "cache", "frames-24")
    mtimes = {f: os.path.getmtime(f) for f in glob.glob(os.path.join(folder, "*.npy"))}
    counts = write_cache(copy, "--frame-side", 24)
    assert counts["frames"] == {"written": 0, "present": 36, "failed": 0} and counts["audio"]["written"] == 0
    assert {f: os.path.getmtime(f) for f in glob.glob(os.path.join(folder, "*.npy"))} == mtimes
    victim = sorted(mtimes)[0]
    os.remove(victim)
    open(os.path.join(folder, "x.npy.123.tmp"), "w").close()  # left by an interrupted run

    def half_save(f, array):
        f.write(b"\x93NUMPY half")
        raise OSError("disk full")

    monkeypatch.setattr(cache.np, "save", half_save)
    counts = write_cache(copy, "--frame-side", 24, workers=1)
    assert counts["frames"] == {"written": 0, "present": 35, "failed": 1}
    assert not os.path.exists(victim) and not glob.glob(os.path.join(folder, "*.tmp"))
    monkeypatch.undo()
    assert write_cache(copy, "--frame-side", 24, workers=1)["frames"] == {"written": 1, "present": 35, "failed": 0}
    assert np.load(victim).shape[1:] == (24, 24, 3)


def test_missing_cache_is_a_one_line_error(copy):
    with pytest.raises(SystemExit) as e:
        build_datasets(data_args(copy, cache=True))  # side 256 was never written
    msg = str(e.value)
    assert "\n" not in msg and os.path.join(copy, "synthetic", "cache", "frames-256") in msg
    assert f"`python -m preprocess.cache --dataset synthetic --data-root {copy} --frame-side 256`" in msg
    with pytest.raises(
        SystemExit,
        match=r"audio-cremad-\w+ not found.*--audio-pipeline cremad --audio-seconds 2.0 "
        r"--frame-side 24`",
    ):
        build_datasets(data_args(copy, cache=True, cache_frame_side=24, audio_pipeline="cremad", audio_seconds=2.0))


def test_mismatched_meta_is_a_one_line_error(copy):
    meta_path = os.path.join(copy, "synthetic", "cache", "frames-24", "meta.json")
    meta = json.load(open(meta_path))
    json.dump(dict(meta, side=0), open(meta_path, "w"))
    with pytest.raises(SystemExit) as e:
        build_datasets(data_args(copy, cache=True, cache_frame_side=24))
    assert "\n" not in str(e.value) and f"{meta_path} was written for other settings" in str(e.value)
    assert "--frame-side 24`" in str(e.value)
    with pytest.raises(SystemExit, match="written for other settings; delete .*frames-24 and run this again"):
        write_cache(copy, "--frame-side", 24)  # the cache step does not add entries to it either


def test_missing_entry_is_a_one_line_error_at_index_time(copy):
    folder = os.path.join(copy, "synthetic", "cache", "audio-synthetic-*")
    gone = sorted(glob.glob(os.path.join(folder, "*.npy")))[3]
    os.remove(gone)
    with pytest.raises(SystemExit) as e:
        build_datasets(data_args(copy, cache=True, cache_frame_side=24))
    assert "\n" not in str(e.value) and f"1 entries of the splits' clips are missing (first: {gone})" in str(e.value)


def test_random_window_audio_is_not_cached(copy, capsys):
    write_cache(copy, "--frame-side", 24, "--audio-pipeline", "stft16k", workers=1)
    assert "audio not cached: the training window of the stft16k pipeline is random" in capsys.readouterr().out
    assert not glob.glob(os.path.join(copy, "synthetic", "cache", "audio-stft16k*"))
    train, _, _ = build_datasets(data_args(copy, cache=True, cache_frame_side=24, audio_pipeline="stft16k"))
    assert train.audio_cache is None and train.frame_cache.endswith("frames-24")
    assert train.frontend(train[0][0]).shape == (129, 626)  # the waveform window, the model computes the STFT


def test_missing_dataset_root(tmp_path):
    with pytest.raises(SystemExit, match="dataset root .*cremad not found"):
        cache.main(["--dataset", "cremad", "--data-root", str(tmp_path)])


def test_script_runs_with_cache(copy, tmp_path):
    proc, _ = run_script(
        "baseline.py", copy, tmp_path / "runs", *"--cache --epochs 1 --max-steps 2".split(), check=False
    )
    assert proc.returncode != 0 and proc.stderr.strip().splitlines()[-1].startswith("--cache: ")  # side 256 not written
    write_cache(copy)
    _, run = run_script(
        "baseline.py", copy, tmp_path / "runs", *"--cache --epochs 1 --max-steps 2 --eval-max-steps 1".split()
    )
    r = read_results(run)
    assert r["args"]["cache"] is True and r["args"]["cache_frame_side"] == 256 and "test/acc" in r["last"]


def test_cache_flags_are_saved_with_the_run(tmp_path):
    """--cache changes the frames slightly (side != 0), so on --resume the saved value wins, like any training flag."""
    from common.runs import saved_run

    torch.save({"args": {"cache": True, "cache_frame_side": 24, "data_root": "saved"}}, tmp_path / "last.pt")
    args = data_args("elsewhere")
    args.resume, args.eval_only = str(tmp_path), False
    args, _ = saved_run(args)
    assert args.cache is True and args.cache_frame_side == 24 and args.data_root == "elsewhere"


def test_flat_layout_three_frames_exact_at_side_0(tmp_path):
    """Kinetics-Sounds layout, 3 frames drawn per clip, a cached audio pipeline (pkl1004): items equal bitwise."""
    from test_data import write_clip

    root = tmp_path / "kinetics_sounds"
    (root / "audio").mkdir(parents=True)
    ids = ["--4-0ihtnBU_000058_000068", "abc_000010_000020", "-x_1"]
    for i, c in enumerate(ids):
        write_clip(str(root), c, n_frames=5, seed=i)
    (root / "my_train.txt").write_text(f"{ids[0]},10,0\n{ids[1]},10,30\n")
    (root / "my_test.txt").write_text(f"{ids[2]},10,7\n")
    cache.main(
        [
            "--dataset",
            "ks",
            "--data-root",
            str(tmp_path),
            "--audio-pipeline",
            "pkl1004",
            "--frame-side",
            "0",
            "--workers",
            "1",
        ]
    )
    kw = dict(dataset="ks", audio_pipeline="pkl1004")
    live = build_datasets(data_args(tmp_path, **kw))
    hit = build_datasets(data_args(tmp_path, cache=True, cache_frame_side=0, **kw))
    for ds, dc in zip(live[:2], hit[:2]):
        assert dc.audio_cache and dc.frame_cache
        for i in range(len(ds)):
            with threads(1):
                torch.manual_seed(7 + i)
                a = ds[i]
                torch.manual_seed(7 + i)
                b = dc[i]
            assert a[1].shape[1] == 3 and all(torch.equal(x, y) for x, y in zip(a, b)), (ds.train, i)


def test_regenerating_the_synthetic_set_drops_its_cache(tmp_path):
    generate(str(tmp_path / "s"), n_train=6, n_test=6)
    (tmp_path / "s" / "cache" / "frames-256").mkdir(parents=True)
    generate(str(tmp_path / "s"), n_train=6, n_test=6, seed=1)
    assert not (tmp_path / "s" / "cache").exists()
