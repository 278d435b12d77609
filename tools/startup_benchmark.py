"""Start-up time at scale: `build_datasets` (the training and test sets, before the first step) on a generated tree
of many clips, without the clip index (the full start-up check of every file), with a valid index, and after one
clip changed (docs/data.md, "The clip index"). It prints numbers; nothing here is asserted.

    python -m tools.startup_benchmark                               # 200,000 VGGSound-format clips x 10 frames
    python -m tools.startup_benchmark --layout cremad --frames 3    # the CREMA-D layout
    python -m tools.startup_benchmark --clips 2000 --runs 1         # a quick look

The tree, in a temporary folder (removed at the end; --work-dir keeps it): hard links to a few wav and JPEG files
written by the synthetic generator (common/synthetic.py), at most 50,000 links per file (ext4 allows 65,000), so
2.2 million files cost little disk. One clip in 1,000 is named by its split file but has no files (VGGSound's
missing videos), one in 5,000 has a cut wav and one in 5,000 a cut frame: the runs skip them, counted, and every
indexed run's clips, labels, order and skips are compared with those of the full check. The test split holds one
clip in 13 (VGGSound: 15,446 of about 200,000).

Each condition is timed in this process, `--runs` times: wall and CPU seconds of build_datasets. "After one clip
changed": before each run another clip's wav is replaced by a new, cut file (written and renamed into place).
"Another torchrun rank": build_datasets as a rank other than 0 runs it once rank 0 has validated the index (it reads
the index and checks no file); the rank and the message from rank 0 are simulated in this one process.
"""

import argparse
import contextlib
import hashlib
import io
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
import warnings

from common import clip_index, distributed
from common.data import DATASETS, build_datasets
from common.flags import add_data_args
from common.splits import CREMAD_LABELS

LINKS_PER_FILE = 50_000
LAYOUTS = {  # name -> (--dataset, folder, default frames per clip)
    "vggsound": ("vggsound", "vggsound", 10),
    "cremad": ("cremad", "cremad", 3),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layout", default="vggsound", choices=sorted(LAYOUTS), help="on-disk layout of the tree")
    p.add_argument("--clips", type=int, default=200_000, help="clips in the tree (train + test)")
    p.add_argument("--frames", type=int, default=None, help="frame files per clip (default: vggsound 10, cremad 3)")
    p.add_argument("--runs", type=int, default=3, help="timed runs of each condition with the index")
    p.add_argument("--full-runs", type=int, default=1, help="timed runs of the full check without the index")
    p.add_argument("--work-dir", default=None, help="write the tree here and keep it (default: a temporary folder)")
    p.add_argument("--json", default=None, help="also write the numbers to this file")
    a = p.parse_args(argv)
    for name in ("clips", "runs"):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(a, name)}")
    if a.full_runs < 0:
        p.error(f"--full-runs must be 0 or more, got {a.full_runs}")
    a.frames = a.frames or LAYOUTS[a.layout][2]
    least = DATASETS[LAYOUTS[a.layout][0]]["n_frames"]  # fewer and the runs would skip every clip
    if a.frames < least:
        p.error(f"--frames must be at least {least} (the {a.layout} default --n-frames), got {a.frames}")
    return a


def sources(work, n_wav, n_jpg):
    """n_wav wav and n_jpg JPEG files written by the synthetic generator, plus one cut wav and one cut JPEG."""
    from common.synthetic import generate

    src = os.path.join(work, "sources")
    generate(src, n_train=max(n_wav, (n_jpg + 1) // 2), n_test=1, min_frames=2, max_frames=2)
    wavs = sorted(os.path.join(src, "AudioWAV", f) for f in os.listdir(os.path.join(src, "AudioWAV")))[:n_wav]
    jpgs = [
        os.path.join(d, f)
        for d in sorted(os.path.join(src, "Image-01-FPS", c) for c in os.listdir(os.path.join(src, "Image-01-FPS")))
        for f in sorted(os.listdir(d))
    ][:n_jpg]
    cut = {}
    for kind, path in (("wav", wavs[0]), ("jpg", jpgs[0])):
        cut[kind] = os.path.join(src, f"cut.{kind}")
        with open(path, "rb") as f, open(cut[kind], "wb") as g:
            g.write(f.read()[: 200 if kind == "jpg" else 1000])  # JPEG: no end marker; wav: fewer bytes than declared
    return wavs, jpgs, cut


def clip_ids(layout, n):
    if layout == "cremad":
        return [(f"{1000000 + i}_SYN_{CREMAD_LABELS[i % 6]}_XX", CREMAD_LABELS[i % 6]) for i in range(n)]
    return [(f"v{i:010d}_{i % 300:06d}", str(i % 309)) for i in range(n)]  # <11-character id>_<start:06d>


def write_tree(a, work):
    """The tree under <work>/data/<folder>; returns (--data-root, the dataset folder, its audio folder's name, counts
    of what was written)."""
    dataset, folder, _ = LAYOUTS[a.layout]
    root = os.path.join(work, "data", folder)
    audio, frames = ("AudioWAV", "Image-01-FPS") if a.layout == "cremad" else ("audio", "frames")
    n_wav = -(-a.clips // LINKS_PER_FILE)
    n_jpg = -(-a.clips * a.frames // LINKS_PER_FILE)
    wavs, jpgs, cut = sources(work, n_wav, n_jpg)
    os.makedirs(os.path.join(root, audio))
    os.makedirs(os.path.join(root, frames))
    rows = {"train": [], "test": []}
    stats = dict(missing=0, cut_wav=0, cut_frame=0)
    n_frame = 0
    for i, (clip_id, label) in enumerate(clip_ids(a.layout, a.clips)):
        rows["test" if i % 13 == 12 else "train"].append(f"{clip_id},{label}\n")
        if i % 1000 == 999:  # named by the split, no files
            stats["missing"] += 1
            continue
        cut_wav, cut_frame = i % 5000 == 4998, i % 5000 == 4997
        stats["cut_wav"] += cut_wav
        stats["cut_frame"] += cut_frame
        os.link(cut["wav"] if cut_wav else wavs[i // LINKS_PER_FILE], os.path.join(root, audio, f"{clip_id}.wav"))
        d = os.path.join(root, frames, clip_id)
        os.mkdir(d)
        for k in range(a.frames):
            os.link(
                cut["jpg"] if cut_frame and k == a.frames - 1 else jpgs[n_frame // LINKS_PER_FILE],
                os.path.join(d, f"{k:05d}.jpg"),
            )
            n_frame += 1
    if a.layout == "cremad":
        split_path = {s: os.path.join(root, f"{s}.csv") for s in rows}
    else:
        os.makedirs(os.path.join(root, "splits"))
        split_path = {s: os.path.join(root, "splits", f"{s}.csv") for s in rows}
        with open(os.path.join(root, "classes.txt"), "w") as f:
            f.writelines(f"class_{k:03d}\n" for k in range(309))
    for s, lines in rows.items():
        with open(split_path[s], "w") as f:
            f.writelines(lines)
    stats.update(
        train=len(rows["train"]),
        test=len(rows["test"]),
        wav_sources=len(wavs),
        jpg_sources=len(jpgs),
        files=(a.clips - stats["missing"]) * (1 + a.frames),
    )
    return os.path.join(work, "data"), root, audio, stats


def timed_build(data_root, dataset):
    """(wall s, CPU s, what build_datasets gave: per split (digest of the clips, skipped), the skip warnings)."""
    args = add_data_args(argparse.ArgumentParser()).parse_args(
        ["--dataset", dataset, "--data-root", data_root, "--num-workers", "0"]
    )
    with warnings.catch_warnings(record=True) as w, contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("always")
        t, c = time.perf_counter(), time.process_time()
        train, test, _ = build_datasets(args)
        wall, cpu = time.perf_counter() - t, time.process_time() - c
    # a digest of the clips, not the clips: a million objects kept alive would slow the collector in later runs
    clips = [
        hashlib.sha256(repr([(x.clip_id, x.label, x.wav, x.frame_dir) for x in ds.clips]).encode()).hexdigest()
        for ds in (train, test)
    ]
    return wall, cpu, (list(zip(clips, (train.skipped, test.skipped))), sorted(str(x.message) for x in w))


@contextlib.contextmanager
def without_index():
    """build_datasets as before the clip index: every file of every clip checked, no index read or written."""
    real = clip_index.clip_facts
    clip_index.clip_facts = lambda path, paths, layout, mode="use": real(None, paths, layout, "off")
    try:
        yield
    finally:
        clip_index.clip_facts = real


@contextlib.contextmanager
def other_rank(root):
    """build_datasets as a torchrun rank other than 0: rank 0's message (the id of the index it validated, one per
    split, train first) is read from the index files rank 0 left."""
    ids = itertools.cycle([json.load(open(clip_index.index_path(root, s)))["id"] for s in ("train", "test")])
    real = distributed.is_main, distributed.broadcast_object
    distributed.is_main, distributed.broadcast_object = (lambda: False), (lambda obj: next(ids))
    try:
        yield
    finally:
        distributed.is_main, distributed.broadcast_object = real


def change_one_clip(root, audio, ids, k, cut_wav):
    """Replace the wav of clip k by a new file (a cut copy: the clip is then skipped), renamed into place."""
    wav = os.path.join(root, audio, f"{ids[k]}.wav")
    shutil.copyfile(cut_wav, wav + ".tmp")
    os.replace(wav + ".tmp", wav)


def main(argv=None):
    a = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)
    work = a.work_dir or tempfile.mkdtemp(prefix="bml_startup_")
    dataset = LAYOUTS[a.layout][0]
    results = {}
    try:
        t = time.perf_counter()
        data_root, root, audio, stats = write_tree(a, work)
        written = time.time()
        print(
            f"{a.layout} layout: {a.clips} clips x {a.frames} frames, {stats['files']} files ({stats['train']} "
            f"train / {stats['test']} test rows; {stats['missing']} without files, {stats['cut_wav']} with a cut "
            f"wav, {stats['cut_frame']} with a cut frame), hard links to {stats['wav_sources']} wav and "
            f"{stats['jpg_sources']} JPEG files; written in {time.perf_counter() - t:.0f} s"
        )
        print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at the start")
        print("build_datasets (training + test set), seconds: wall (CPU)")

        def show(name, runs):
            results[name] = [dict(wall=w, cpu=c) for w, c, _ in runs]
            print(f"  {name:<46}" + ", ".join(f"{w:.2f} ({c:.2f})" for w, c, _ in runs))

        full = []
        with without_index():
            full = [timed_build(data_root, dataset) for _ in range(max(1, a.full_runs))]
        reference = full[0][2]
        if a.full_runs:
            show("without the index (the full check)", full)
        time.sleep(max(0.0, clip_index.RACY_NS / 1e9 - (time.time() - written)))  # stamps settled (RACY_NS)
        runs = {"first start: full check, index written": [timed_build(data_root, dataset)]}
        runs["with a valid index"] = [timed_build(data_root, dataset) for _ in range(a.runs)]
        with other_rank(root):
            runs["another torchrun rank (reads rank 0's index)"] = [
                timed_build(data_root, dataset) for _ in range(a.runs)
            ]
        ids = [c for c, _ in clip_ids(a.layout, a.clips)]
        changed, after = [], []
        for r in range(a.runs):
            k = next(k for k in range(a.clips // (a.runs + 1) * (r + 1), a.clips) if k % 1000 != 999)
            change_one_clip(root, audio, ids, k, os.path.join(work, "sources", "cut.wav"))
            changed.append(ids[k])
            after.append(timed_build(data_root, dataset))
        runs["after one clip changed"] = after
        for name, r in runs.items():
            show(name, r)
        with without_index():
            final = timed_build(data_root, dataset)[2]
        same = all(r[2] == reference for r in itertools.chain(*(v for k, v in runs.items() if "changed" not in k)))
        cut_now = [c for _, skipped in final[0] for c in skipped.get("truncated wav", [])]
        same_after = after[-1][2] == final and all(c in cut_now for c in changed)
        skipped = sum(len(v) for _, s in reference[0] for v in s.values())
        print(
            f"same clips, labels, order and skips ({skipped} skipped) as the full check: "
            f"{'yes' if same else 'NO'}; after the changes, as a new full check: {'yes' if same_after else 'NO'}"
        )
        results.update(
            layout=a.layout,
            clips=a.clips,
            frames=a.frames,
            same=same,
            same_after_change=same_after,
            skipped=skipped,
            tree=stats,
        )
    finally:
        if not a.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
