"""The clip index (common/clip_index.py; docs/data.md, "The clip index"): the same clips, labels, order and skips as
the full start-up check; reused without checking any clip's files; every change the cheap check covers is found and
only the changed clips are checked again; what it cannot see (shown, and found by --recheck-clips); an index that
is damaged, outdated or cannot be written; several processes starting together, alone and under torchrun."""

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import time
import warnings

import pytest
from conftest import ROOT

from common import clip_index, splits
from common.audio import check_wav
from common.data import build_datasets
from common.flags import add_data_args
from common.frames import check_image, list_frames
from common.splits import CREMAD_LABELS, SkippedClipsWarning, cremad_clips, flat_clips
from preprocess.synthetic import generate


# ---- helpers ---------------------------------------------------------------------------------------------------
def reference(root, split, n_frames):
    """The full start-up check as common/splits.py index_clips did it before the index, re-expressed here: the rows
    in order, a repeated id dropped, then each clip's wav, its frame count and every frame file, in that order."""
    clips, skipped, seen = [], {}, set()
    for _, (clip_id, emo) in splits.read_rows(os.path.join(root, f"{split}.csv")):
        wav, frame_dir = os.path.join(root, "AudioWAV", f"{clip_id}.wav"), os.path.join(root, "Image-01-FPS", clip_id)
        names = list_frames(frame_dir)
        if clip_id in seen:
            problem = "duplicate row"
        elif not os.path.isfile(wav):
            problem = "missing wav"
        elif check_wav(wav):
            problem = check_wav(wav)
        elif not names:
            problem = "missing frames"
        elif len(names) < n_frames:
            problem = f"fewer than {n_frames} frames"
        else:
            problem = next((p for p in (check_image(os.path.join(frame_dir, n)) for n in names) if p), None)
        seen.add(clip_id)
        if problem:
            skipped.setdefault(problem, []).append(clip_id)
        else:
            clips.append(splits.Clip(clip_id, wav, frame_dir, CREMAD_LABELS.index(emo)))
    return clips, skipped


def run(root, split="train", n_frames=2, index="use"):
    """(clips, skipped, the SkippedClipsWarning messages) of cremad_clips; each warning names the line that called
    cremad_clips, as before the index (stacklevel 3 of index_clips: no frame added between)."""
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        clips, skipped = cremad_clips(str(root), split, n_frames, index=index)
    warned = [x for x in w if issubclass(x.category, SkippedClipsWarning)]
    assert all(x.filename == __file__ for x in warned), [x.filename for x in warned]
    return clips, skipped, [str(x.message) for x in warned]


def same_as_full_check(root, split="train", n_frames=2, full_check_warned=None):
    """cremad_clips through the index gives the reference's clips and skips and the full check's warning (that of
    `index="off"`, or `full_check_warned` where check_clip is patched)."""
    full_check_warned = full_check_warned or run(root, split, n_frames, index="off")[2]
    clips, skipped, warned = run(root, split, n_frames)  # last: clip_index.LAST tells what it did
    assert (clips, skipped) == reference(str(root), split, n_frames) and warned == full_check_warned
    return clips, skipped, warned


def age(root, seconds=3600):
    """Date every file and folder under root an hour back: the index then trusts their stamps (RACY_NS)."""
    t = time.time() - seconds
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            os.utime(os.path.join(dirpath, name), (t, t))
    os.utime(root, (t, t))


def cut(path, n):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:n])


def frames_of(root, clip_id):
    d = os.path.join(root, "Image-01-FPS", clip_id)
    return [os.path.join(d, n) for n in list_frames(d)]


def split_ids(root, split="train"):
    return [row[0] for _, row in splits.read_rows(os.path.join(root, f"{split}.csv"))]


def no_check(*a):
    raise AssertionError("a clip's files were checked")


@pytest.fixture
def root(tmp_path):
    """A CREMA-D-layout set with a clip for every skip reason, a repeated row and a row naming no files; dated an
    hour back."""
    r = str(tmp_path / "cremad")
    generate(r, n_train=16, n_test=6, min_frames=2, max_frames=3)
    ids = split_ids(r)
    wav = lambda c: os.path.join(r, "AudioWAV", f"{c}.wav")  # noqa: E731
    cut(wav(ids[0]), 100)  # truncated wav
    open(wav(ids[1]), "wb").close()  # empty wav
    with open(wav(ids[2]), "wb") as f:
        f.write(b"not a wav at all" * 10)  # unreadable wav
    shutil.rmtree(os.path.join(r, "Image-01-FPS", ids[3]))  # missing frames
    for p in frames_of(r, ids[4])[1:]:
        os.remove(p)  # one frame: fewer than 2 frames
    open(frames_of(r, ids[5])[1], "wb").close()  # empty frame file
    with open(frames_of(r, ids[6])[0], "wb") as f:
        f.write(b"garbage" * 50)  # corrupt frame
    cut(frames_of(r, ids[7])[-1], 300)  # truncated frame
    os.remove(wav(ids[8]))  # missing wav
    with open(os.path.join(r, "train.csv"), "a", newline="") as f:
        f.write(f"{ids[9]},{ids[9].split('_')[2]}\r\n9999_SYN_HAP_XX,HAP\r\n")  # a repeated row, a clip not on disk
    age(r)
    return r


# ---- the same clips, labels, order and skips -------------------------------------------------------------------
def test_the_index_gives_what_the_full_check_gives(root, monkeypatch):
    clips, skipped, warned = same_as_full_check(root, n_frames=2)
    assert clip_index.LAST == dict(checked=17, trusted=False, written=True)  # 18 rows, one repeated
    assert set(skipped) == {
        "truncated wav",
        "empty wav",
        "unreadable wav",
        "missing frames",
        "fewer than 2 frames",
        "empty frame file",
        "corrupt frame",
        "truncated frame",
        "missing wav",
        "duplicate row",
    }
    assert skipped["missing wav"] == [split_ids(root)[8], "9999_SYN_HAP_XX"] and len(warned) == 1
    assert os.path.isfile(os.path.join(root, "clip_index.train.json"))
    full_check_warned = {n: run(root, n_frames=n, index="off")[2] for n in (1, 3)}
    full_check_warned[2] = warned
    monkeypatch.setattr(clip_index, "check_clip", no_check)  # from now on the index alone
    for n_frames in (2, 1, 3):  # one index for every --n-frames: its findings do not depend on it
        same_as_full_check(root, n_frames=n_frames, full_check_warned=full_check_warned[n_frames])
        assert clip_index.LAST == dict(checked=0, trusted=False, written=False)
    assert "fewer than 2 frames" not in run(root, n_frames=1)[1] and "fewer than 3 frames" in run(root, n_frames=3)[1]


def test_flat_layout_and_both_splits_of_one_file(tmp_path, monkeypatch):
    """The flat layout (KS, VGGSound) with both splits read from the one official vggsound.csv: an index per split."""
    src, flat = str(tmp_path / "src"), tmp_path / "vggsound"
    generate(src, n_train=6, n_test=3)
    os.makedirs(flat / "audio")
    rows = []
    for split in ("train", "test"):
        for k, clip_id in enumerate(split_ids(src, split)):
            yt = f"yt{split}{k}"
            shutil.copyfile(os.path.join(src, "AudioWAV", f"{clip_id}.wav"), flat / "audio" / f"{yt}_000030.wav")
            shutil.copytree(os.path.join(src, "Image-01-FPS", clip_id), flat / "frames" / f"{yt}_000030")
            rows.append(f"{yt},30,{clip_id.split('_')[2]},{split}\n")
    os.remove(flat / "audio" / "yttrain2_000030.wav")
    (flat / "vggsound.csv").write_text("".join(rows) + "ytgone,30,HAP,train\n")
    age(str(flat))
    want = {s: flat_clips(str(flat), s, 2, "vggsound", index="off")[:2] for s in ("train", "test")}
    assert want["train"][1] == {"missing wav": ["yttrain2_000030", "ytgone_000030"]}
    for split in ("train", "test"):
        assert flat_clips(str(flat), split, 2, "vggsound")[:2] == want[split]
        assert clip_index.LAST["written"] and os.path.isfile(flat / f"clip_index.{split}.json")
    monkeypatch.setattr(clip_index, "check_clip", no_check)
    for split in ("train", "test"):
        assert flat_clips(str(flat), split, 2, "vggsound")[:2] == want[split]
        assert clip_index.LAST == dict(checked=0, trusted=False, written=False)


# ---- changes found, only the changed clips checked again --------------------------------------------------------
def _copy_clip(root, src, dst):
    shutil.copyfile(os.path.join(root, "AudioWAV", f"{src}.wav"), os.path.join(root, "AudioWAV", f"{dst}.wav"))
    shutil.copytree(os.path.join(root, "Image-01-FPS", src), os.path.join(root, "Image-01-FPS", dst))


def _rewrite_rows(root, fn):
    path = os.path.join(root, "train.csv")
    lines = open(path, newline="").read().splitlines(keepends=True)
    with open(path, "w", newline="") as f:
        f.writelines(fn(lines))


def _replace_frame(root, c):
    """A frame replaced the usual safe way: a new file renamed over it (here a corrupt one)."""
    p = frames_of(root, c)[0]
    with open(p + ".tmp", "wb") as f:
        f.write(b"garbage" * 50)
    os.replace(p + ".tmp", p)


def _junk_header(path):
    """The wav rewritten in place, the same size: its RIFF header overwritten (a new mtime)."""
    with open(path, "r+b") as f:
        f.write(b"JUNK")


def _rewrite_folder(root, c):
    """The clip's frame folder deleted and written again (as preprocess/video.py extracts a clip again), its last
    frame cut."""
    d = os.path.join(root, "Image-01-FPS", c)
    frames = {os.path.basename(p): open(p, "rb").read() for p in frames_of(root, c)}
    shutil.rmtree(d)
    os.mkdir(d)
    for k, (name, data) in enumerate(sorted(frames.items())):
        with open(os.path.join(d, name), "wb") as f:
            f.write(data[:300] if k == len(frames) - 1 else data)


def _relabel(rows, k):
    clip_id, emo = rows[k].strip().split(",")
    return rows[:k] + [f"{clip_id},{'NEU' if emo != 'NEU' else 'HAP'}\r\n"] + rows[k + 1 :]


def _with_frames(root, ids, n):
    return next(c for c in ids[10:] if len(frames_of(root, c)) == n)


CHANGES = {  # name -> (change(root, train ids), clips checked again); each changes what the split holds at 3 frames
    "wav cut": (lambda r, ids: cut(os.path.join(r, "AudioWAV", f"{ids[10]}.wav"), 200), 1),
    "wav rewritten in place, same size": (
        lambda r, ids: _junk_header(os.path.join(r, "AudioWAV", f"{ids[10]}.wav")),
        1,
    ),
    "frame removed": (lambda r, ids: os.remove(frames_of(r, _with_frames(r, ids, 3))[1]), 1),
    "frame added": (
        lambda r, ids: shutil.copyfile(
            frames_of(r, ids[10])[0], os.path.join(r, "Image-01-FPS", _with_frames(r, ids, 2), "99999.jpg")
        ),
        1,
    ),
    "frame replaced by a renamed file": (lambda r, ids: _replace_frame(r, _with_frames(r, ids, 3)), 1),
    "frame folder written again": (lambda r, ids: _rewrite_folder(r, _with_frames(r, ids, 3)), 1),
    "clip's files deleted": (
        lambda r, ids: (
            os.remove(os.path.join(r, "AudioWAV", f"{ids[12]}.wav")),
            shutil.rmtree(os.path.join(r, "Image-01-FPS", ids[12])),
        ),
        1,
    ),
    "missing clip's files written": (lambda r, ids: _copy_clip(r, ids[13], "9999_SYN_HAP_XX"), 1),
    "clip added to the split": (
        lambda r, ids: (
            _copy_clip(r, ids[13], "8888_SYN_SAD_XX"),
            _rewrite_rows(r, lambda rows: rows + ["8888_SYN_SAD_XX,SAD\r\n"]),
        ),
        1,
    ),
    "row removed": (lambda r, ids: _rewrite_rows(r, lambda rows: rows[:5] + rows[6:]), 0),
    "label changed": (lambda r, ids: _rewrite_rows(r, lambda rows: _relabel(rows, 10)), 0),
    "rows reordered": (lambda r, ids: _rewrite_rows(r, lambda rows: rows[::-1]), 0),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_change_is_found_and_only_that_clip_checked_again(root, change):
    fn, n_checked = CHANGES[change]
    before = same_as_full_check(root, n_frames=3)[:2]
    fn(root, split_ids(root))
    after = same_as_full_check(root, n_frames=3)[:2]
    assert after != before and clip_index.LAST["checked"] == n_checked
    assert clip_index.LAST["written"] == (change not in ("label changed", "rows reordered"))  # same clips: kept
    index = json.load(open(os.path.join(root, "clip_index.train.json")))
    assert sorted(index["clips"]) == sorted(set(split_ids(root)))  # the split's clips, no more


def test_what_the_cheap_check_cannot_see_and_recheck_finds(root):
    """A frame file rewritten in place (not renamed into place), whatever its size, and a wav rewritten in place with
    the same size and its mtime put back, are not seen (docs/data.md); --recheck-clips finds them."""
    ids = split_ids(root)
    same_as_full_check(root)
    cut(frames_of(root, ids[10])[0], 300)  # in place: the folder's stamp does not change
    wav = os.path.join(root, "AudioWAV", f"{ids[11]}.wav")
    st = os.stat(wav)
    with open(wav, "r+b") as f:
        f.write(b"JUNK")  # the RIFF header gone, same size
    os.utime(wav, ns=(st.st_atime_ns, st.st_mtime_ns))
    stale = run(root)[:2]
    assert clip_index.LAST["checked"] == 0 and ids[10] in [c.clip_id for c in stale[0]]
    want = reference(root, "train", 2)
    assert stale != want and {c.clip_id for c in stale[0]} - {c.clip_id for c in want[0]} == {ids[10], ids[11]}
    assert run(root, index="recheck")[:2] == want and clip_index.LAST == dict(checked=17, trusted=False, written=True)
    assert run(root)[:2] == want and clip_index.LAST["checked"] == 0


def test_build_datasets_recheck_clips_flag(root):
    args = add_data_args(argparse.ArgumentParser()).parse_args(
        ["--dataset", "cremad", "--data-root", os.path.dirname(root), "--recheck-clips"]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedClipsWarning)
        build_datasets(args)
        assert clip_index.LAST == dict(checked=6, trusted=False, written=True)  # the test split, last
        args.recheck_clips = False
        build_datasets(args)
    assert clip_index.LAST == dict(checked=0, trusted=False, written=False)


def test_a_change_just_before_the_index_was_written_is_checked_again(root):
    """Stamps younger than RACY_NS when the index was written are not trusted: a wav rewritten in place within the
    file system's timestamp granularity keeps its size and mtime, and is still found at the next start."""
    wav = os.path.join(root, "AudioWAV", f"{split_ids(root)[10]}.wav")
    recent = time.time_ns() + 86_400 * 10**9  # a day ahead: recent whenever the index is written
    os.utime(wav, ns=(recent, recent))
    same_as_full_check(root)
    with open(wav, "r+b") as f:
        f.write(b"JUNK")
    os.utime(wav, ns=(recent, recent))  # the stamp the index holds
    clips, skipped = same_as_full_check(root)[:2]
    assert skipped["unreadable wav"] == [split_ids(root)[2], split_ids(root)[10]]
    assert clip_index.LAST["checked"] == 1  # the recent clip only: the others' stamps are an hour old
    same_as_full_check(root)
    assert clip_index.LAST["checked"] == 1  # dated in the future: checked at every start


# ---- a damaged, outdated or unwritable index --------------------------------------------------------------------
@pytest.mark.parametrize(
    "damage", ["garbage", "cut short", "other check code", "other layout", "bad entry", "bad clip id"]
)
def test_a_damaged_or_outdated_index_is_checked_again(root, damage):
    path = os.path.join(root, "clip_index.train.json")
    same_as_full_check(root)
    text = open(path).read()
    data = json.loads(text)
    if damage == "garbage":
        text = "not json"
    elif damage == "cut short":
        text = text[: len(text) // 2]
    elif damage == "other check code":
        text = json.dumps(dict(data, check="0" * 16))
    elif damage == "other layout":
        text = json.dumps(dict(data, wav="audio/\u0000.wav"))
    elif damage == "bad entry":
        data["frame_files"][3] = "three"
        text = json.dumps(data)
    else:
        data["clips"][3] = ["not", "an", "id"]
        text = json.dumps(data)
    with open(path, "w") as f:
        f.write(text)
    same_as_full_check(root)
    assert clip_index.LAST == dict(checked=1 if damage == "bad entry" else 17, trusted=False, written=True)
    json.load(open(path))  # whole again


def _read_only(monkeypatch):
    """clip_index cannot create or write any file (as in a read-only folder; root ignores the folder's mode)."""
    real = open

    def fake(path, mode="r", *a, **k):
        if any(m in mode for m in "wax+"):
            raise PermissionError(13, "Permission denied", path)
        return real(path, mode, *a, **k)

    monkeypatch.setattr(clip_index, "open", fake, raising=False)


def test_read_only_folder_falls_back_to_the_full_check_with_a_note(root, monkeypatch, capsys):
    _read_only(monkeypatch)
    same_as_full_check(root)
    assert clip_index.LAST == dict(checked=17, trusted=False, written=False)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("note: cannot write the clip index ") and "Permission denied" in err[0]
    assert not [f for f in os.listdir(root) if f.startswith("clip_index")]


def test_an_index_that_cannot_be_replaced_leaves_no_temporary_file(root, capsys):
    """A real failure, no patch: a folder where the index file should be. The write fails at the rename; the note is
    printed, the temporary file removed, the clips are the full check's."""
    os.mkdir(os.path.join(root, "clip_index.train.json"))
    same_as_full_check(root)
    assert clip_index.LAST == dict(checked=17, trusted=False, written=False)
    assert capsys.readouterr().err.count("note: cannot write the clip index") == 1
    assert sorted(f for f in os.listdir(root) if f.startswith("clip_index")) == [
        "clip_index.lock",
        "clip_index.train.json",
    ]


def test_read_only_folder_with_a_valid_index_uses_it(root, monkeypatch, capsys):
    warned = same_as_full_check(root)[2]
    capsys.readouterr()
    _read_only(monkeypatch)
    monkeypatch.setattr(clip_index, "check_clip", no_check)
    same_as_full_check(root, full_check_warned=warned)
    assert clip_index.LAST == dict(checked=0, trusted=False, written=False) and capsys.readouterr().err == ""


# ---- several processes ------------------------------------------------------------------------------------------
TOGETHER = """
import json, os, sys, time
from common import clip_index
from common.splits import cremad_clips
root, gate = sys.argv[1], sys.argv[2]
check = clip_index.check_clip
clip_index.check_clip = lambda *a: (time.sleep(0.05), check(*a))[1]  # a build long enough to overlap the other's
open(os.path.join(gate, f"ready{os.getpid()}"), "w").close()
while not os.path.exists(os.path.join(gate, "go")):
    time.sleep(0.005)
clips, skipped = cremad_clips(root, "train", 2)
print(json.dumps([clip_index.LAST, [c.clip_id for c in clips], skipped]))
"""


def test_two_processes_started_together_check_once(root, tmp_path):
    """Both start on a set without an index at the same moment: one checks the clips and writes the index while the
    other waits for the lock, then finds the index valid; both get the full check's clips."""
    gate = tmp_path / "gate"
    gate.mkdir()
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", TOGETHER, root, str(gate)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    deadline = time.time() + 300
    while len(os.listdir(gate)) < 2 and time.time() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.01)
    (gate / "go").touch()
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    results = [json.loads(o.strip().splitlines()[-1]) for o, _ in outs]
    assert sorted(r[0]["checked"] for r in results) == [0, 17]
    want = reference(root, "train", 2)
    assert all(r[1] == [c.clip_id for c in want[0]] and r[2] == want[1] for r in results)
    assert sorted(f for f in os.listdir(root) if f.startswith("clip_index")) == [
        "clip_index.lock",
        "clip_index.train.json",
    ]


RANKS = """
import json, sys
import torch.distributed as dist
root, store, rank, case = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2)
from common import clip_index
from common.splits import cremad_clips
def no(*a):
    raise AssertionError("rank 1 looked at a clip's files")
if rank == 1 and case == "shared":
    clip_index.check_clip = clip_index._stamp = no
if case == "read-only":
    def no_write(path, mode="r", *a, **k):
        if any(m in mode for m in "wax+"):
            raise PermissionError(13, "Permission denied", path)
        return open(path, mode, *a, **k)
    clip_index.open = no_write
out = []
for split in ("train", "test"):
    clips, skipped = cremad_clips(root, split, 2)
    out.append([dict(clip_index.LAST), [c.clip_id for c in clips], skipped])
print(json.dumps(out))
dist.destroy_process_group()
"""


@pytest.mark.parametrize("case", ["shared", "read-only"])
def test_torchrun_ranks_read_the_index_rank_0_validated(root, tmp_path, case):
    """Rank 0 checks and writes the index, rank 1 reads that index and looks at no clip's files (its check and stat
    functions raise). If no index can be written (read-only), each rank checks for itself; the clips are the same."""
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    store = str(tmp_path / "store")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RANKS, root, store, str(r), case],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    r0, r1 = (json.loads(o.strip().splitlines()[-1]) for o, _ in outs)
    for k, split in enumerate(("train", "test")):
        want = reference(root, split, 2)
        assert r0[k][1] == r1[k][1] == [c.clip_id for c in want[0]] and r0[k][2] == r1[k][2] == want[1]
        n = 17 if split == "train" else 6
        if case == "shared":
            assert r0[k][0] == dict(checked=n, trusted=False, written=True)
            assert r1[k][0] == dict(checked=0, trusted=True, written=False)
        else:
            assert r0[k][0] == r1[k][0] == dict(checked=n, trusted=False, written=False)


def test_the_split_builders_pause_the_garbage_collector(root, monkeypatch):
    """index_clips runs with the cyclic collector paused (clip_index.gc_paused), which it leaves as it found it,
    also when it fails."""
    seen, check = [], clip_index.check_clip

    def spy(*a):
        seen.append(gc.isenabled())
        return check(*a)

    monkeypatch.setattr(clip_index, "check_clip", spy)
    run(root, index="off")
    assert seen and not any(seen) and gc.isenabled()
    with open(os.path.join(root, "test.csv"), "a") as f:
        f.write("1234_SYN_XYZ_XX,XYZ\n")
    with pytest.raises(ValueError, match="unknown label"):
        cremad_clips(root, "test", 1)
    assert gc.isenabled()
    gc.disable()
    try:
        run(root, index="off")
        assert not gc.isenabled()
    finally:
        gc.enable()


# ---- the benchmark ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["vggsound", "cremad"])
def test_startup_benchmark_reports_every_condition(tmp_path, layout):
    """tools/startup_benchmark.py at a tiny size: every condition printed, the indexed runs' clips and skips
    the full check's (its numbers are measurements, never asserted here)."""
    out = tmp_path / "startup.json"
    cmd = [
        sys.executable,
        "-m",
        "tools.startup_benchmark",
        "--layout",
        layout,
        "--clips",
        "5000",
        "--frames",
        "3",
        "--runs",
        "2",
        "--work-dir",
        str(tmp_path / "work"),
        "--json",
        str(out),
    ]
    proc = subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["same"] and r["same_after_change"] and r["skipped"] == 5 + 1 + 1  # rows without files, a cut wav, frame
    for name in (
        "without the index (the full check)",
        "first start: full check, index written",
        "with a valid index",
        "another torchrun rank (reads rank 0's index)",
        "after one clip changed",
    ):
        assert name in proc.stdout and all(v["wall"] > 0 for v in r[name]), name
    assert len(r["with a valid index"]) == 2 and "as the full check: yes" in proc.stdout
