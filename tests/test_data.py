"""Loaders: real-parameter shapes on generated files in each layout, deterministic test-time sampling, pairing by
clip id, and every bad-input case (data.md)."""

import argparse
import hashlib
import os
import shutil
import wave

import numpy as np
import pytest
import torch

from common.audio import AUDIO_PIPELINES, AudioPipeline, read_wav
from common.data import LoadFailedWarning, build_datasets
from common.flags import add_data_args
from common.frames import select_frames
from common.splits import SkippedClipsWarning
from common.synthetic import class_colours, generate, make_frame, write_wav


def data_args(**kw):
    args = add_data_args(argparse.ArgumentParser()).parse_args([])
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def write_clip(root, clip_id, seconds=3.0, sr=16000, n_frames=4, px=48, seed=0):
    rng = np.random.RandomState(seed)
    write_wav(os.path.join(root, "audio", f"{clip_id}.wav"), 0.1 * rng.randn(int(sr * seconds)), sr)
    fdir = os.path.join(root, "frames", clip_id)
    os.makedirs(fdir, exist_ok=True)
    for k in range(n_frames):
        make_frame(rng, 0, class_colours(6), px, 1.0).save(os.path.join(fdir, f"{k * 25:05d}.jpg"))


@pytest.fixture
def cremad_root(tmp_path):
    generate(str(tmp_path / "cremad"), n_train=4, n_test=3, sample_rate=16000, audio_seconds=2.0, frame_px=48)
    return tmp_path


@pytest.fixture
def ks_root(tmp_path):
    root = tmp_path / "kinetics_sounds"
    (root / "audio").mkdir(parents=True)
    ids = ["--4-0ihtnBU_000058_000068", "abc_000010_000020", "-x_1"]
    for i, c in enumerate(ids):
        write_clip(str(root), c, seed=i)
    (root / "my_train.txt").write_text(f"{ids[0]},10,0\n{ids[1]},10,30\n")
    (root / "my_test.txt").write_text(f"{ids[2]},10,7\n")
    return tmp_path


@pytest.fixture
def vgg_root(tmp_path):
    root = tmp_path / "vggsound"
    (root / "audio").mkdir(parents=True)
    rows = [
        ("yt1", "30", "dog barking", "train"),
        ("yt2", "5", "cat meowing", "train"),
        ("yt3", "120", "dog barking", "test"),
    ]
    for i, (y, s, _, _) in enumerate(rows):
        write_clip(str(root), f"{y}_{int(s):06d}", seconds=10.0, seed=i)
    (root / "vggsound.csv").write_text("".join(f"{y},{s},{lab},{sp}\n" for y, s, lab, sp in rows))
    return tmp_path


def spectrogram(ds, i):
    """Item i's spectrogram as the model sees it: the waveform window through the set's front-end (STFT pipelines,
    the current loader), or the item's audio as it is."""
    x = ds[i][0]
    return x if ds.frontend is None else ds.frontend(x)


def test_cremad_real_parameters(cremad_root):
    train, test, classes = build_datasets(data_args(dataset="cremad", data_root=str(cremad_root)))
    assert classes == ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"]
    wave, frames, label = train[0]
    assert wave.shape == (66150,) and wave.dtype == torch.float32  # 3 s at 22,050 Hz: the model computes the STFT
    assert spectrogram(train, 0).shape == (257, 188) and spectrogram(train, 0).dtype == torch.float32
    assert frames.shape == (3, 1, 224, 224) and label.dtype == torch.long
    assert spectrogram(test, 0).shape == (257, 188)
    for ds in (train, test):  # label from the split row matches the emotion in the clip id
        for c in ds.clips:
            assert classes[c.label] == c.clip_id.split("_")[2]


def test_cremad_aug_20s_audio(cremad_root):
    train, _, _ = build_datasets(data_args(dataset="cremad", data_root=str(cremad_root), audio_seconds=20.0))
    assert spectrogram(train, 0).shape == (257, 1250)


def test_ks_flat_layout_with_official_split_rows(ks_root):
    train, test, classes = build_datasets(data_args(dataset="ks", data_root=str(ks_root)))
    assert len(classes) == 31 and [c.label for c in train.clips] == [0, 30] and test.clips[0].label == 7
    assert spectrogram(train, 0).shape == (129, 626) and train[0][1].shape == (3, 3, 224, 224)


@pytest.mark.parametrize("pipeline,shape", [("pkl1004", (257, 1004)), ("fbank", (1024, 128)), ("aug35k", (257, 1003))])
def test_ks_audio_variants(ks_root, pipeline, shape):
    train, _, _ = build_datasets(data_args(dataset="ks", data_root=str(ks_root), audio_pipeline=pipeline))
    assert spectrogram(train, 0).shape == shape and (train.frontend is None) == (pipeline != "aug35k")


def test_tpami_frames(ks_root):
    train, test, _ = build_datasets(
        data_args(dataset="ks", data_root=str(ks_root), frame_size=112, tpami_frames=True, clip_consistent_aug=True)
    )
    assert train[0][1].shape == (3, 3, 112, 112) and test[0][1].shape == (3, 3, 112, 112)


def test_vggsound_official_csv(vgg_root):
    train, test, classes = build_datasets(data_args(dataset="vggsound", data_root=str(vgg_root)))
    assert classes == ["cat meowing", "dog barking"]  # alphabetical
    assert [(c.clip_id, c.label) for c in train.clips] == [("yt1_000030", 1), ("yt2_000005", 0)]
    assert test.clips[0].clip_id == "yt3_000120"
    assert spectrogram(train, 0).shape == (129, 626)


def test_test_time_sampling_is_deterministic(ks_root):
    train, test, _ = build_datasets(data_args(dataset="ks", data_root=str(ks_root)))
    test.clips = test.clips * 1
    a, b = test[0], test[0]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    torch.manual_seed(0)
    x, y = train[0], train[0]
    assert not torch.equal(x[0], y[0])  # random 5 s window when training
    assert not torch.equal(x[1], y[1])  # random crop / frame when training


def test_frame_selection_rule():
    assert select_frames(10, 3, train=False) == [1, 4, 8]  # segments [0,3) [3,6) [6,10): middles
    assert select_frames(3, 1, train=False) == [1]
    assert select_frames(10, 3, train=False, mode="first") == [0, 1, 2]
    g = torch.Generator().manual_seed(0)
    seen = {tuple(select_frames(10, 3, train=True, generator=g)) for _ in range(300)}
    assert all(0 <= i < 3 and 3 <= j < 6 and 6 <= k < 10 for i, j, k in seen)
    assert {s[2] for s in seen} == {6, 7, 8, 9}
    with pytest.raises(ValueError):
        select_frames(2, 3, train=False)


def test_stft16k_test_window_is_centre_of_training_range():
    pipe = AudioPipeline(AUDIO_PIPELINES["stft16k"])
    x = torch.arange(16000 * 10, dtype=torch.float32)
    w = pipe.window_samples(x, train=False)
    assert len(w) == 80000 and w[0].item() == 40000


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_read_wav_sample_widths(tmp_path, width):
    x = np.sin(np.linspace(0, 20, 1000)) * 0.5
    scale = {1: 127, 2: 32767, 3: 2**23 - 1, 4: 2**31 - 1}[width]
    ints = np.round(x * scale).astype(np.int64)
    if width == 1:
        raw = (ints + 128).astype(np.uint8).tobytes()
    elif width == 3:
        raw = b"".join(int(v).to_bytes(3, "little", signed=True) for v in ints)
    else:
        raw = ints.astype({2: "<i2", 4: "<i4"}[width]).tobytes()
    path = str(tmp_path / "x.wav")
    with wave.open(path, "wb") as w:
        w.setnchannels(1), w.setsampwidth(width), w.setframerate(8000), w.writeframes(raw)
    y, sr = read_wav(path)
    assert sr == 8000 and np.abs(y - x).max() < 0.02


def test_synthetic_is_deterministic(tmp_path):
    def digest(root):
        h = hashlib.sha256()
        for dirpath, _, files in sorted(os.walk(root)):
            for f in sorted(files):
                h.update(f.encode())
                h.update(open(os.path.join(dirpath, f), "rb").read())
        return h.hexdigest()

    generate(str(tmp_path / "a"), n_train=6, n_test=3, seed=3)
    generate(str(tmp_path / "b"), n_train=6, n_test=3, seed=3)
    generate(str(tmp_path / "c"), n_train=6, n_test=3, seed=4)
    assert digest(tmp_path / "a") == digest(tmp_path / "b") != digest(tmp_path / "c")


def test_split_lines_bom_and_crlf(cremad_root):
    path = cremad_root / "cremad" / "train.csv"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    train, _, _ = build_datasets(data_args(dataset="cremad", data_root=str(cremad_root)))
    assert len(train) == 4


# ---- bad input -------------------------------------------------------------------------------------------------
def test_missing_root(tmp_path):
    with pytest.raises(SystemExit, match="cremad.*not found.*preprocess.cremad"):
        build_datasets(data_args(dataset="cremad", data_root=str(tmp_path)))


def test_missing_split_file(cremad_root):
    os.remove(cremad_root / "cremad" / "test.csv")
    with pytest.raises(SystemExit, match="test.csv not found"):
        build_datasets(data_args(dataset="cremad", data_root=str(cremad_root)))


def test_split_naming_clips_not_on_disk(cremad_root):
    root = cremad_root / "cremad"
    with open(root / "train.csv", "a", newline="") as f:
        f.write("9999_XXX_HAP_XX,HAP\r\n9998_XXX_SAD_XX,SAD\r\n")
    with pytest.warns(SkippedClipsWarning, match=r"skipped 2 of 6 clips \(missing wav: 2 \(first: 9999_XXX_HAP_XX"):
        train, _, _ = build_datasets(data_args(dataset="cremad", data_root=str(cremad_root)))
    assert len(train) == 4 and train.skipped["missing wav"] == ["9999_XXX_HAP_XX", "9998_XXX_SAD_XX"]


def test_missing_frames_do_not_shift_pairs(cremad_root):
    root = cremad_root / "cremad"
    first = (root / "train.csv").read_text().split(",")[0]
    shutil.rmtree(root / "Image-01-FPS" / first)
    with pytest.warns(SkippedClipsWarning, match="missing frames: 1"):
        train, _, classes = build_datasets(data_args(dataset="cremad", data_root=str(cremad_root)))
    assert len(train) == 3
    for c in train.clips:
        assert os.path.basename(c.wav)[:-4] == os.path.basename(c.frame_dir) == c.clip_id
        assert classes[c.label] == c.clip_id.split("_")[2]


def test_every_split_clip_missing(cremad_root):
    shutil.rmtree(cremad_root / "cremad" / "AudioWAV")
    with pytest.raises(SystemExit, match="none of its"), pytest.warns(SkippedClipsWarning):
        build_datasets(data_args(dataset="cremad", data_root=str(cremad_root)))


def test_unreadable_wav_is_skipped(cremad_root):
    root = cremad_root / "cremad"
    first = (root / "train.csv").read_text().split(",")[0]
    (root / "AudioWAV" / f"{first}.wav").write_bytes(b"not a wav file at all")
    with pytest.warns(SkippedClipsWarning, match="unreadable wav: 1"):
        train, _, _ = build_datasets(data_args(dataset="cremad", data_root=str(cremad_root)))
    assert first not in [c.clip_id for c in train.clips]
    with pytest.raises(ValueError, match=f"{first}.wav: unreadable wav"):
        read_wav(str(root / "AudioWAV" / f"{first}.wav"))


def test_unreadable_jpeg_names_the_file(cremad_root):
    root = cremad_root / "cremad"
    train, _, _ = build_datasets(data_args(dataset="cremad", data_root=str(cremad_root)))
    for f in os.listdir(train.clips[0].frame_dir):
        (root / "Image-01-FPS" / train.clips[0].clip_id / f).write_bytes(b"\xff\xd8garbage")
    with pytest.raises(ValueError, match=r"\.jpg: unreadable image"):
        train.load(0)
    with pytest.warns(LoadFailedWarning, match=r"\.jpg: unreadable image"):  # the loader replaces it by clip 1
        train[0]
    assert train.load_failures.tolist() == [1, 0, 0, 0]


def test_unknown_label(cremad_root):
    with open(cremad_root / "cremad" / "train.csv", "a", newline="") as f:
        f.write("1234_ABC_XYZ_XX,XYZ\r\n")
    with pytest.raises(SystemExit, match=r"train.csv:5: unknown label 'XYZ'"):
        build_datasets(data_args(dataset="cremad", data_root=str(cremad_root)))


def test_ks_label_out_of_range(ks_root):
    (ks_root / "kinetics_sounds" / "my_train.txt").write_text("abc_000010_000020,10,31\n")
    with pytest.raises(SystemExit, match="my_train.txt:1: label 31 out of range"):
        build_datasets(data_args(dataset="ks", data_root=str(ks_root)))


def test_fewer_frames_than_asked(ks_root):
    root = ks_root / "kinetics_sounds"
    fdir = root / "frames" / "abc_000010_000020"
    for f in sorted(os.listdir(fdir))[2:]:
        os.remove(fdir / f)
    with pytest.warns(SkippedClipsWarning, match="fewer than 3 frames: 1"):
        train, _, _ = build_datasets(data_args(dataset="ks", data_root=str(ks_root)))
    assert [c.clip_id for c in train.clips] == ["--4-0ihtnBU_000058_000068"]
