"""Preprocessing: 1-fps frame extraction with OpenCV, the CREMA-D step (frames, audio, splits), resumability and the
clear error when ffmpeg is missing."""

import os
import shutil

import cv2
import numpy as np
import pytest

from common.synthetic import write_wav
from preprocess import cremad, video


def write_video(path, seconds=2.5, fps=30, px=32):
    out = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"MJPG"), fps, (px, px))
    assert out.isOpened()
    for i in range(int(seconds * fps)):
        out.write(np.full((px, px, 3), (i * 3) % 255, np.uint8))
    out.release()


def test_extract_frames_first_frame_of_every_second(tmp_path):
    write_video(str(tmp_path / "v.avi"))
    n = video.extract_frames(str(tmp_path / "v.avi"), str(tmp_path / "f"))
    assert n == 3 and sorted(os.listdir(tmp_path / "f")) == ["00000.jpg", "00030.jpg", "00060.jpg"]


def test_unreadable_video(tmp_path):
    (tmp_path / "bad.avi").write_bytes(b"nope")
    with pytest.raises(ValueError, match="bad.avi"):
        video.extract_frames(str(tmp_path / "bad.avi"), str(tmp_path / "f"))


def test_missing_ffmpeg_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(SystemExit, match="ffmpeg not found on PATH"):
        video.require_ffmpeg()


@pytest.fixture
def cremad_src(tmp_path):
    src = tmp_path / "CREMA-D"
    (src / "VideoFlash").mkdir(parents=True)
    (src / "AudioWAV").mkdir()
    ids = [f"{1001 + i}_IEO_{emo}_HI" for i, emo in enumerate(["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"] * 2)]
    for c in ids:
        write_video(str(src / "VideoFlash" / f"{c}.avi"), seconds=1.2)
        write_wav(str(src / "AudioWAV" / f"{c}.wav"), np.zeros(16000), 16000)
    return src, ids


def test_cremad_preprocess_and_stratified_split(cremad_src, tmp_path):
    src, ids = cremad_src
    out = tmp_path / "out"
    cremad.main(["--src", str(src), "--out", str(out), "--workers", "1", "--test-fraction", "0.5"])
    assert sorted(os.listdir(out / "Image-01-FPS" / ids[0])) == [".done", "00000.jpg", "00030.jpg"]
    assert (out / "AudioWAV" / f"{ids[0]}.wav").read_bytes() == (src / "AudioWAV" / f"{ids[0]}.wav").read_bytes()
    train = (out / "train.csv").read_text().splitlines()
    test = (out / "test.csv").read_text().splitlines()
    assert len(train) == len(test) == 6  # one of each emotion in each split
    assert sorted(r.split(",")[1] for r in test) == ["ANG", "DIS", "FEA", "HAP", "NEU", "SAD"]
    first = (out / "train.csv").read_bytes()
    # resumable: a second run skips finished clips and writes the same split
    os.remove(out / "Image-01-FPS" / ids[0] / "00030.jpg")
    cremad.main(["--src", str(src), "--out", str(out), "--workers", "1", "--test-fraction", "0.5"])
    assert not (out / "Image-01-FPS" / ids[0] / "00030.jpg").exists()  # finished clip untouched
    assert (out / "train.csv").read_bytes() == first


def test_cremad_official_splits_are_copied(cremad_src, tmp_path):
    src, ids = cremad_src
    splits = tmp_path / "splits"
    splits.mkdir()
    (splits / "train.csv").write_text(f"{ids[0]},NEU\r\n")
    (splits / "test.csv").write_text(f"{ids[1]},HAP\r\n")
    out = tmp_path / "out"
    cremad.main(["--src", str(src), "--out", str(out), "--workers", "1", "--splits", str(splits)])
    assert (out / "test.csv").read_bytes() == f"{ids[1]},HAP\r\n".encode()


def test_cremad_missing_source(tmp_path):
    with pytest.raises(SystemExit, match="VideoFlash not found"):
        cremad.main(["--src", str(tmp_path), "--out", str(tmp_path / "o")])


def test_failed_clips_are_counted(cremad_src, tmp_path, capsys):
    src, ids = cremad_src
    (src / "VideoFlash" / f"{ids[0]}.avi").write_bytes(b"broken")
    out = tmp_path / "out"
    cremad.main(["--src", str(src), "--out", str(out), "--workers", "1"])
    assert "1 of 12 clips failed" in capsys.readouterr().out
    assert ids[0] in (out / "failed.txt").read_text()
    assert ids[0] not in (out / "train.csv").read_text() + (out / "test.csv").read_text()
