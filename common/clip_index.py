"""The clip index: what the start-up check found for each clip of a split, kept beside the data so that a run checks
the files only of the clips that changed since (docs/data.md, "The clip index").

    <root>/clip_index.<split>.json    JSON: {"format", "check", "wav", "frame_dir", "time", "id",
                                            "clips": [ids], "stamps": [digests], "frame_files": [counts],
                                            "problems": {clip_id: [problem, frame problem]}}

`check_clip` is the full start-up check of one clip (headers only, common/audio.py check_wav, common/frames.py
check_image); `clip_facts` gives its findings for every clip of a split: from the index where the clip's stamps
(wav: size, mtime, inode; frame folder: mtime, inode) are those the index holds, from `check_clip` otherwise, and
writes the index again when anything differed. The findings do not depend on --n-frames (common/splits.py applies
it), so one index serves every run. Labels, order and duplicate rows come from the split file, read at every start.

Several processes: each validates and writes under an exclusive lock on `<root>/clip_index.lock` (the others wait,
then find the index valid); the file is written to a temporary name and renamed into place. Under torchrun rank 0
validates it and sends the other ranks its id: they read the same index and check no file themselves.
"""

import contextlib
import fcntl
import functools
import gc
import hashlib
import inspect
import json
import os
import sys
import time

from common import audio, distributed, frames
from common.audio import check_wav
from common.frames import check_image, list_frames

FORMAT = 1
# a clip whose wav or frame folder changed less than this before the index was written is checked again at the next
# start: a change within the file system's timestamp granularity (FAT: 2 s) could otherwise keep the same stamp
RACY_NS = 5_000_000_000
LOUD = 10_000  # a first check of at least this many clips says what it is doing
LAST = {}  # what the last clip_facts call did (tests, tools/startup_benchmark.py)


def check_clip(wav, frame_dir):
    """The full start-up check of one clip's files: (problem, frame files, frame problem). `problem` is found before
    the frames are counted ("missing wav", a check_wav reason, "missing frames"); `frame problem` is the first frame
    file's check_image reason. common/splits.py turns them into the clip's skip reason for a given --n-frames."""
    if not os.path.isfile(wav):
        return "missing wav", 0, None
    problem = check_wav(wav)  # header, sample width and declared length against the file size
    if problem:
        return problem, 0, None
    names = list_frames(frame_dir)
    if not names:
        return "missing frames", 0, None
    # every frame file, not only those a split draws: the clip set never depends on the frame flags
    return None, len(names), next((p for p in (check_image(os.path.join(frame_dir, n)) for n in names) if p), None)


_CHECK = (check_clip, check_wav, audio._data_chunk, check_image, list_frames)  # the code check_code digests


@functools.cache
def check_code():
    """A digest of the check's code: an index written by another version of the check is not used."""
    try:
        parts = [inspect.getsource(f) for f in _CHECK]
    except (OSError, TypeError):  # no source files (a frozen build): the format number alone
        parts = ["no source"]
    return hashlib.sha256("\n".join([*parts, repr(frames._MARKERS), str(frames.TAIL)]).encode()).hexdigest()[:16]


def _stamp(wav, frame_dir):
    """(digest of the clip's stamps, the newer of the two mtimes): the wav's size, mtime and inode and the frame
    folder's mtime and inode (-1s for a missing one), digested by Python's hash of a tuple of integers, which is
    the same in every process (PYTHONHASHSEED only changes the hashes of strings); another Python version may
    digest differently, which only means that every clip is checked once more."""
    try:
        s = os.stat(wav)
        a, newest = (s.st_size, s.st_mtime_ns, s.st_ino), s.st_mtime_ns
    except OSError:
        a, newest = (-1, -1, -1), 0
    try:
        d = os.stat(frame_dir)
        b, newest = (d.st_mtime_ns, d.st_ino), max(newest, d.st_mtime_ns)
    except OSError:
        b = (-1, -1)
    return hash((a, b)), newest


def _header(path, layout):
    """What an index must match to be used: the format, the check's code and where a clip's files are (`layout`:
    the wav and frame folder paths of the clip id "\0", made relative to the index's folder, so that the same
    folder reached by another path keeps its index)."""
    base = os.path.dirname(os.path.abspath(path))
    return dict(
        format=FORMAT,
        check=check_code(),
        wav=os.path.relpath(layout[0], base),
        frame_dir=os.path.relpath(layout[1], base),
    )


def _load(path, want):
    """The index at `path` if it is readable, well formed and matches `want` (_header), else None."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):  # absent, unreadable, or cut short: checked and written again
        return None
    try:
        ok = (
            all(data[k] == v for k, v in want.items())
            and type(data["time"]) is int
            and len(data["clips"]) == len(data["stamps"]) == len(data["frame_files"])
            and all(type(c) is str for c in data["clips"])
            and all(
                type(v) is list and len(v) == 2 and all(x is None or type(x) is str for x in v)
                for v in data["problems"].values()
            )
        )
    except (TypeError, KeyError, AttributeError):
        return None
    return data if ok else None


def _positions(ids, data):
    """Position in the index of each id (None if absent): the identity when the index lists the same clips in the
    same order, as it does when the split file has not changed."""
    if ids == data["clips"]:
        return range(len(ids))
    where = {c: i for i, c in enumerate(data["clips"])}
    return [where.get(c) for c in ids]


def _finding(data, j, c):
    """The index's findings of clip c (position j), or None if they are malformed."""
    n = data["frame_files"][j]
    problem, frame_problem = data["problems"].get(c, (None, None))
    return (problem, n, frame_problem) if type(n) is int else None


@contextlib.contextmanager
def _locked(path):
    """An exclusive lock on <folder>/clip_index.lock while a process validates or writes an index there (none in a
    folder where it cannot be created: read-only data)."""
    try:
        f = open(os.path.join(os.path.dirname(os.path.abspath(path)), "clip_index.lock"), "a")
    except OSError:
        yield
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file is closed
        yield


def _write(path, data):
    """Write the index atomically (a temporary file renamed into place); False, with a one-line note, if it
    cannot be written."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, separators=(",", ":"))
        os.replace(tmp, path)
        return True
    except OSError as e:
        print(
            f"note: cannot write the clip index {path} ({e.strerror or e}); until it can be written, every "
            'start-up checks the files of the clips it does not vouch for (docs/data.md, "The clip index")',
            file=sys.stderr,
        )
        return False
    finally:  # a write that failed or was interrupted leaves nothing behind (after os.replace there is no tmp)
        with contextlib.suppress(OSError):
            os.remove(tmp)


def _refresh(path, paths, layout, recheck):
    """(findings of every clip of `paths`, id of the index on disk that holds them, or None): the index's findings
    for the clips whose stamps match it, check_clip for the others (for every clip with `recheck`); the index is
    written again if anything differed."""
    want, ids = _header(path, layout), list(paths)
    with _locked(path):
        start = time.time_ns()
        data = None if recheck else _load(path, want)
        if not data and len(ids) >= LOUD:
            why = "--recheck-clips" if recheck else f"no valid clip index {path}"
            print(
                f"checking the files of {len(ids)} clips ({why}); the index written now makes the next start-ups fast",
                file=sys.stderr,
            )
        where = _positions(ids, data) if data else [None] * len(ids)
        settled = data["time"] - RACY_NS if data else 0  # stamps older than this are trusted
        facts, stamps, checked = {}, [], 0
        for c, j in zip(ids, where):
            wav, frame_dir = paths[c]
            h, newest = _stamp(wav, frame_dir)
            f = _finding(data, j, c) if j is not None and data["stamps"][j] == h and newest < settled else None
            if f is None:
                f = check_clip(wav, frame_dir)
                checked += 1
            facts[c] = f
            stamps.append(h)
        LAST.update(checked=checked, trusted=False, written=False)
        if data and not checked and len(data["clips"]) == len(ids):  # every entry used, none left over
            return facts, data["id"]
        new = dict(
            want,
            time=start,
            id=os.urandom(8).hex(),
            clips=ids,
            stamps=stamps,
            frame_files=[facts[c][1] for c in ids],
            problems={c: [f[0], f[2]] for c, f in facts.items() if f[0] or f[2]},
        )
        LAST["written"] = _write(path, new)
        return facts, new["id"] if LAST["written"] else None


def _trusted(path, paths, layout, token):
    """The findings of the clips of `paths` from the index rank 0 just validated (its id is `token`), without looking
    at any clip's files; None if the index here is not that one (another node's copy of the data, or rank 0 could
    not write it)."""
    data = token and _load(path, _header(path, layout))
    if not data or data["id"] != token:
        return None
    ids = list(paths)
    where = _positions(ids, data)
    facts = {c: _finding(data, j, c) if j is not None else None for c, j in zip(ids, where)}
    if any(f is None for f in facts.values()):
        return None
    LAST.update(checked=0, trusted=True, written=False)
    return facts


def clip_facts(path, paths, layout, mode="use"):
    """{clip_id: check_clip findings} for `paths` ({clip_id: (wav, frame folder)}, the unique clips of a split).
    `path`: the index file, or None for the full check without an index (as `mode` "off"); `mode` "recheck": the
    full check, written to the index. `layout`: the (wav, frame folder) paths of the clip id "\0"."""
    if path is None or mode == "off":
        LAST.update(checked=len(paths), trusted=False, written=False)
        return {c: check_clip(wav, frame_dir) for c, (wav, frame_dir) in paths.items()}
    recheck = mode == "recheck"
    if not distributed.is_main():  # torchrun: rank 0 validates the index first and sends its id
        facts = _trusted(path, paths, layout, distributed.broadcast_object(None))
        return facts if facts is not None else _refresh(path, paths, layout, recheck)[0]
    token = None
    try:
        facts, token = _refresh(path, paths, layout, recheck)
    finally:  # also when it failed: the other ranks must not wait for a message that never comes
        distributed.broadcast_object(token)
    return facts


@contextlib.contextmanager
def gc_paused():
    """Python's cyclic garbage collector paused inside the block (left as it was found). A split of 200,000 clips
    allocates about a million small objects, and the collector's passes over them were about a quarter of the
    start-up with a valid index (docs/data.md, "The clip index"); none of them is in a reference cycle, so reference
    counting frees them all."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def index_path(root, split):
    return os.path.join(root, f"clip_index.{split}.json")
