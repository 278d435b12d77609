"""Throughput benchmark: data loading alone, the model step alone, end to end, per method, with peak memory.

    python -m tools.benchmark                                  # all sizes and methods (2-core CPU: ~15 minutes)
    python -m tools.benchmark --sizes synthetic cremad         # a few minutes
    python -m tools.benchmark --sizes cremad --batch-size 64 --steps 20 --device cuda      # on a GPU
    python -m tools.benchmark --script-args="--amp --channels-last"                       # the speed flags
    python -m tools.benchmark --sizes cremad vggsound --loading-only                # the loaders, side by side

For the synthetic dataset and for synthetic data at the real CREMA-D (audio 257 x 188, one 224 x 224 frame) and
VGGSound (129 x 626, three frames) input sizes, it prints:
- the loaders side by side: CPU ms per clip on one core of the previous loader (--legacy-loader) and the current
  one, reading the files and the cache, train and test transforms; the per-stage profile (read, resample, STFT,
  decode, augment); the peak memory of a loader worker; and the model-only step per clip beside them;
- data loading alone: the training DataLoader iterated without a model (clips/s), with 0 workers and the default,
  reading the files and then the cache of `python -m preprocess.cache` (--cache, frames at the default side 256);
- model step alone: each method script run on in-memory tensors (`--in-memory`): the median wall time of a
  training step, clips/s, the ratio to baseline.py's step (on a CPU, of the fastest step's CPU time, which other
  jobs on a shared machine disturb least; --rounds repeats the runs), and peak memory (CUDA: max allocated; CPU:
  the process's peak RSS);
- end to end: baseline.py (or every method, --e2e-all) reading the files with its default loader settings, and
  its throughput as a share of the model-only throughput.
Step times come from the scripts themselves, traced by tools/trace.py, so they time the real loops.
For the real sizes a small synthetic set is written in the CREMA-D layout (wav files and JPEG frames), so decoding,
STFT, resizing and augmentation cost what they would on the real clips: 16 kHz wavs of 1-3.5 s (uniform) at the
CREMA-D size, of 10 s at the VGGSound size. The frames (--frames natural, the default) are a real photograph of a
face (the portrait matplotlib ships as sample data), cut to 480 x 360 like a CREMA-D video frame, moved and
brightened a little per frame, and saved at JPEG quality 95 as the preprocess steps save them: about 68 KB, more
detail than a typical video still. --frames noise writes the synthetic generator's frames instead (pixel noise of
std 50, --frame-px square, about 100 KB).
"""

import argparse
import contextlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import numpy as np
import torch
from matplotlib import cbook
from PIL import Image

import baseline
from common.audio import read_wav
from common.data import DATASETS, build_datasets, make_loaders, usable_cpus
from common.frames import decode_opencv, list_frames, load_frame, load_image
from common.synthetic import ensure_synthetic, generate, write_wav
from preprocess import cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ["baseline", "ogm", "opm", "arl", "dgl", "aug", "mmpareto", "inforeg"]
METHOD_ARGS = {"opm": ["--warmup-epochs", "0"], "arl": ["--warmup-epochs", "0"]}  # the method active from step 0
# size -> (--dataset for --in-memory, loader flags for the on-disk synthetic set, generator settings or None); the
# CREMA-D-size wavs are then cut to 1-3.5 s (DURATIONS)
SIZES = {
    "synthetic": ("synthetic", [], None),
    "cremad": (
        "cremad",
        ["--audio-pipeline", "cremad", "--n-frames", "1", "--frame-size", "224"],
        dict(sample_rate=16000, audio_seconds=3.5, min_frames=2, max_frames=3),
    ),
    "vggsound": (
        "vggsound",
        ["--audio-pipeline", "stft16k", "--n-frames", "3", "--frame-size", "224"],
        dict(sample_rate=16000, audio_seconds=10.0, min_frames=3, max_frames=4),
    ),
}


DURATIONS = {"cremad": (1.0, 3.5)}  # CREMA-D's clips last 1 to 3.5 s: each wav is cut to a uniform draw in this range


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES), help="input sizes to measure")
    p.add_argument(
        "--methods", nargs="+", default=METHODS, choices=METHODS, help="method scripts to time (baseline first)"
    )
    p.add_argument("--batch-size", type=int, default=4, help="global batch of every run")
    p.add_argument("--steps", type=int, default=3, help="timed training steps per run (after one untimed step)")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="repeat the model-only and end-to-end runs (interleaved); the fastest counts",
    )
    p.add_argument(
        "--loader-rounds",
        type=int,
        default=5,
        help="repeat the loader measurements (CPU per clip, stages, decoders: seconds each); fastest counts",
    )
    p.add_argument(
        "--data-batches", type=int, default=12, help="timed batches of the data-loading measurement (after the warm-up)"
    )
    p.add_argument(
        "--num-workers", type=int, default=None, help="loader workers of the end-to-end runs (default: the scripts')"
    )
    p.add_argument(
        "--frames",
        default="natural",
        choices=["natural", "noise"],
        help="natural: a 480x360 photograph (a video still); noise: the generator's noise frames",
    )
    p.add_argument("--frame-px", type=int, default=360, help="side of the noise frames (--frames noise)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device of the runs")
    p.add_argument("--script-args", default="", help='extra flags for every script run, e.g. "--amp --channels-last"')
    p.add_argument("--e2e-all", action="store_true", help="end-to-end runs of every method, not only baseline.py")
    p.add_argument("--work-dir", default=None, help="keep data and runs here (default: a temporary folder, removed)")
    p.add_argument("--json", default=None, help="also write the numbers to this file")
    p.add_argument(
        "--loading-only",
        action="store_true",
        help="only the loader measurements (CPU per clip, stages, worker memory): no script runs",
    )
    p.add_argument("--clips", type=int, default=64, help="clips per CPU-per-clip and stage measurement")
    return p.parse_args(argv)


def write_data(size, work, args):
    """--data-root for the on-disk runs of `size`: the default synthetic set, or a small one at the real sizes."""

    root = os.path.join(work, size)
    if SIZES[size][2] is None:
        ensure_synthetic(os.path.join(root, "synthetic"))
    elif not os.path.isfile(os.path.join(root, "synthetic", "meta.json")):
        warm = 2 * max(4, args.num_workers or 0) + 1  # untimed loader batches (loading_throughput)
        n_train = max(32, args.batch_size * (max(args.steps, warm + args.data_batches) + 2))
        generate(
            os.path.join(root, "synthetic"),
            n_train=n_train,
            n_test=args.batch_size,
            frame_px=args.frame_px,
            **SIZES[size][2],
        )
        if args.frames == "natural":
            natural_frames(os.path.join(root, "synthetic", "Image-01-FPS"))
        if size in DURATIONS:
            cut_wavs(os.path.join(root, "synthetic", "AudioWAV"), *DURATIONS[size])
    return root


def cut_wavs(audio_dir, lo, hi, seed=0):
    """Cut every wav under `audio_dir` to a duration drawn uniformly in [lo, hi] seconds (they are written longer)."""

    rng = np.random.default_rng(seed)
    for name in sorted(os.listdir(audio_dir)):
        path = os.path.join(audio_dir, name)
        x, sr = read_wav(path)
        write_wav(path, x[: int(rng.uniform(lo, hi) * sr)], sr)


def natural_frames(frame_root, seed=0):
    """Overwrite every JPEG under `frame_root` with a natural 480 x 360 frame: matplotlib's sample portrait (512 x
    600), a 4:3 window of it moved by up to 24 px and scaled to 480 x 360, brightness +-10 levels, Gaussian noise
    of std 0.5 (a video codec keeps little sensor noise), JPEG quality 95 (preprocess/video.py's)."""

    with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as im:
        portrait = im.convert("RGB")
    rng = np.random.default_rng(seed)
    for dirpath, _, files in sorted(os.walk(frame_root)):
        for name in sorted(files):
            if name.endswith(".jpg"):
                x0, y0 = rng.integers(0, 25, 2)
                frame = portrait.resize((480, 360), Image.BILINEAR, box=(x0, 60 + y0, x0 + 488, 60 + y0 + 366))
                pixels = np.asarray(frame, np.float64) + rng.uniform(-10, 10) + rng.normal(0, 0.5, (360, 480, 3))
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(os.path.join(dirpath, name), quality=95)


def write_cache(size, data_root, legacy=False):
    """The --cache entries of the on-disk set (preprocess/cache.py, default frame side 256), its output silenced;
    `legacy`: the previous loader's spectrograms (--legacy-loader)."""

    flags = SIZES[size][1]
    keep = [x for k, v in zip(flags[::2], flags[1::2]) if k in ("--audio-pipeline", "--n-frames") for x in (k, v)]
    keep += ["--legacy-loader"] if legacy else []
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        cache.main(
            ["--dataset", "synthetic", "--data-root", data_root, *keep, "--workers", str(min(4, os.cpu_count()))]
        )


def loading_throughput(size, data_root, args, num_workers, cached=False):
    """clips/s of the training loader alone, in the steady state: the first 2 x workers + 1 batches (worker start-up,
    and the batches the workers prefetched meanwhile, prefetch_factor 2) are not timed."""

    train_set, test_set = datasets(size, data_root, False, cached)
    loader, _ = make_loaders(train_set, test_set, loader_args(args, num_workers), torch.Generator().manual_seed(0))
    warm = 2 * num_workers + 1
    it, n, t0 = iter(loader), 0, None
    for k in range(warm + args.data_batches):
        try:
            batch = next(it)
        except StopIteration:  # a small set: a new pass (its start-up is then timed too)
            it = iter(loader)
            batch = next(it)
        if k == warm - 1:
            t0 = time.perf_counter()
        elif k >= warm:
            n += batch[2].shape[0]
    return n / (time.perf_counter() - t0)


def loader_args(args, num_workers):
    """The loader flags of make_loaders: the benchmark's batch size, `num_workers`, the defaults of the rest."""
    return SimpleNamespace(
        batch_size=args.batch_size, num_workers=num_workers, pin_memory="auto", persistent_workers=False
    )


def datasets(size, data_root, legacy, cached):

    a = baseline.parse_args(
        [
            "--dataset",
            "synthetic",
            "--data-root",
            data_root,
            *SIZES[size][1],
            *(["--cache"] if cached else []),
            *(["--legacy-loader"] if legacy else []),
        ]
    )
    with contextlib.redirect_stdout(io.StringIO()):
        train_set, test_set, _ = build_datasets(a)
    return train_set, test_set


def loading_cpu(size, data_root, args, legacy, cached):
    """{"train": ms, "test": ms}: CPU time per clip of one core loading alone (a DataLoader with 0 workers, one
    intra-op thread, batches collated), the training set with its transforms and the test set with its own."""

    train_set, test_set = datasets(size, data_root, legacy, cached)
    train, test = make_loaders(train_set, test_set, loader_args(args, 0), torch.Generator().manual_seed(0))
    out = {}
    for split, loader in (("train", train), ("test", test)):
        n, it = 0, iter(loader)
        next(it)  # untimed: first-call set-up (resampler kernels, ...)
        t0 = time.process_time()
        while n < args.clips:
            try:
                batch = next(it)
            except StopIteration:
                it = iter(loader)
                continue
            n += batch[2].shape[0]
        out[split] = 1000 * (time.process_time() - t0) / n
    return out


def stage_profile(size, data_root, args, legacy, cached):
    """CPU ms per clip of each stage of loading one training clip, through the dataset's own steps
    (common/data.py AVDataset.load_audio / load_frames, then its frame transform): read (the wav, or the cached
    spectrogram), resample, STFT (the window and, where the loader computes it, the spectrogram; the current loader
    hands the window to the model, whose STFT is `model_stft`), decode (the frames, or the cached rows), augment
    (crop, flip, resize)."""

    ds, _ = datasets(size, data_root, legacy, cached)
    t = dict.fromkeys(("read", "resample", "STFT", "decode", "augment"), 0.0)
    clock = time.process_time
    clips = [ds.clips[i % len(ds.clips)] for i in range(args.clips + 1)]
    in_model = ds.stft_in_model
    for k, c in enumerate(clips):
        t0 = clock()
        if ds.audio_cache:
            ds.load_audio(c)
            t1 = t2 = t3 = clock()
        else:  # load_audio's steps, one at a time
            samples, sr = read_wav(c.wav)
            t1 = clock()
            x = ds.audio.resample(samples, sr)
            t2 = clock()
            x = ds.audio.window_samples(x, True)
            if not in_model:
                ds.audio.transform(x)
            t3 = clock()
        frames = ds.load_frames(c)
        t4 = clock()
        ds.frames_tf(frames, True)
        t5 = clock()
        if k:  # the first clip is untimed (set-up)
            for key, dt in zip(t, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
                t[key] += 1000 * dt / args.clips
    return t


def model_stft(size, data_root, args):
    """CPU ms per clip of the current loader's spectrogram on the model's side (the audio encoder's front-end, one
    batch of --batch-size windows at a time, one thread): what moved from the loader to the model step."""
    ds, _ = datasets(size, data_root, False, False)
    if ds.frontend is None:
        return 0.0
    batch = torch.stack([ds.load_audio(ds.clips[i % len(ds.clips)]) for i in range(args.batch_size)])[:, None]
    frontend = ds.frontend
    frontend(batch)
    n, t0 = max(1, args.clips // args.batch_size), time.process_time()
    for _ in range(n):
        frontend(batch)
    return 1000 * (time.process_time() - t0) / (n * args.batch_size)


def decoders(size, data_root, args):
    """CPU ms per frame of the three JPEG decoders on the training clips' frame files (one thread, decoding alone):
    PIL's open + convert("RGB") (the previous loader), OpenCV's imdecode, and simplejpeg (the current loader). All
    three give the same pixels (tests/test_loader_paths.py)."""

    ds, _ = datasets(size, data_root, False, False)
    paths = [os.path.join(c.frame_dir, n) for c in ds.clips for n in list_frames(c.frame_dir)][: args.clips]
    ways = {"PIL": load_image, "OpenCV": lambda p: decode_opencv(np.fromfile(p, np.uint8)), "simplejpeg": load_frame}
    out = {}
    for name, decode in ways.items():
        decode(paths[0])  # untimed: first-call set-up
        t0 = time.process_time()
        for p in paths:
            decode(p)
        out[name] = 1000 * (time.process_time() - t0) / len(paths)
    return out


def worker_memory(size, data_root, args, legacy):
    """Peak resident memory (MB, VmHWM) of one DataLoader worker after loading training batches."""

    train_set, test_set = datasets(size, data_root, legacy, False)
    loader, _ = make_loaders(train_set, test_set, loader_args(args, 1), torch.Generator().manual_seed(0))
    it = iter(loader)
    for _ in range(max(2, args.clips // args.batch_size)):
        try:
            next(it)
        except StopIteration:
            break
    peaks = []
    for w in it._workers:
        with open(f"/proc/{w.pid}/status") as f:
            peaks += [int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM")]
    del it
    return max(peaks) if peaks else float("nan")


def loader_comparison(size, data_root, args):
    """The previous loader (--legacy-loader) and the current one, measured side by side, interleaved (--loader-rounds:
    the fastest of the rounds counts): CPU ms per clip (files and cache, train and test), stages, worker memory."""
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = {"cpu": {}, "stages": {}, "worker_mb": {}}
        for _ in range(args.loader_rounds):
            for cached in (False, True):
                for legacy in (True, False):
                    key = f"{'previous' if legacy else 'current'}{' --cache' if cached else ''}"
                    cpu = loading_cpu(size, data_root, args, legacy, cached)
                    st = stage_profile(size, data_root, args, legacy, cached)
                    old_cpu, old_st = out["cpu"].get(key), out["stages"].get(key)
                    out["cpu"][key] = {k: min(v, old_cpu[k]) for k, v in cpu.items()} if old_cpu else cpu
                    out["stages"][key] = {k: min(v, old_st[k]) for k, v in st.items()} if old_st else st
            dec, old = decoders(size, data_root, args), out.get("decoders")
            out["decoders"] = {k: min(v, old[k]) for k, v in dec.items()} if old else dec
        for legacy in (True, False):
            out["worker_mb"]["previous" if legacy else "current"] = worker_memory(size, data_root, args, legacy)
        out["model_stft"] = min(model_stft(size, data_root, args) for _ in range(args.loader_rounds))
        return out
    finally:
        torch.set_num_threads(torch_threads)


def run_script(method, flags, work, tag, args):
    """Run `<method>.py` for steps + 1 training steps with tracing; returns the step times in seconds (median wall
    time, and the fastest step's CPU time of the training process) and the peak memory in MB."""
    trace = os.path.join(work, "traces", tag)
    shutil.rmtree(trace, ignore_errors=True)
    cmd = [
        sys.executable,
        os.path.join(ROOT, "tools", "trace.py"),
        trace,
        os.path.join(ROOT, f"{method}.py"),
        *flags,
        "--runs-dir",
        os.path.join(work, "runs", tag),
        "--no-progress",
        "--batch-size",
        str(args.batch_size),
        "--epochs",
        "1",
        "--max-steps",
        str(args.steps + 1),
        "--eval-max-steps",
        "1",
        "--device",
        args.device,
        *METHOD_ARGS.get(method, []),
        *args.script_args.split(),
    ]
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    shutil.rmtree(os.path.join(work, "runs", tag), ignore_errors=True)  # checkpoints: hundreds of MB
    with open(os.path.join(trace, "rank0.jsonl")) as f:
        steps = [r for r in map(json.loads, f) if "step" in r]
    wall = statistics.median(b["time"] - a["time"] for a, b in zip(steps, steps[1:]))
    cpu = min(b["cpu"] - a["cpu"] for a, b in zip(steps, steps[1:]))  # other jobs only ever add time
    return {"wall": wall, "cpu": cpu, "peak_mb": max(r["peak_mb"] for r in steps)}


def main(argv=None):
    args = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # each table as soon as it is measured
    work = args.work_dir or tempfile.mkdtemp(prefix="bml_bench_")
    os.makedirs(work, exist_ok=True)
    threads = os.environ.get("OMP_NUM_THREADS", str(torch.get_num_threads()))
    print(
        f"device {args.device}, {os.cpu_count()} CPUs, OMP_NUM_THREADS={threads}, global batch {args.batch_size}, "
        f"{args.steps} timed steps, script flags: {args.script_args or '(none)'}"
    )
    results = {}
    try:
        for size in args.sizes:
            dataset, loader_flags, _ = SIZES[size]
            data_root = write_data(size, work, args)

            default_workers = 0 if size == "synthetic" else min(4, usable_cpus())  # the scripts' default
            e2e_workers = default_workers if args.num_workers is None else args.num_workers
            workers = sorted({0, e2e_workers})
            write_cache(size, data_root)
            write_cache(size, data_root, legacy=True)
            loader = loader_comparison(size, data_root, args)
            if args.loading_only:
                results[size] = {"loader": loader}
                report_loader(size, loader, None, args)
                continue
            load = {w: loading_throughput(size, data_root, args, w) for w in workers}
            load_cached = {w: loading_throughput(size, data_root, args, w, cached=True) for w in workers}
            model, e2e = {}, {}
            for _ in range(args.rounds):  # model-only and end-to-end runs interleaved; the fastest of the rounds counts
                for m in args.methods:
                    t = run_script(
                        m, ["--dataset", dataset, "--in-memory", "--num-workers", "0"], work, f"{size}_{m}_model", args
                    )
                    model[m] = {k: min(v, model[m][k]) for k, v in t.items()} if m in model else t
                for m in args.methods if args.e2e_all else args.methods[:1]:
                    flags = [
                        "--dataset",
                        "synthetic",
                        "--data-root",
                        data_root,
                        "--num-workers",
                        str(e2e_workers),
                        *loader_flags,
                    ]
                    t = run_script(m, flags, work, f"{size}_{m}_e2e", args)
                    e2e[m] = {k: min(v, e2e[m][k]) for k, v in t.items()} if m in e2e else t
            results[size] = {
                "loading_clips_per_s": load,
                "cached_loading_clips_per_s": load_cached,
                "model": model,
                "e2e": e2e,
                "e2e_workers": e2e_workers,
                "loader": loader,
            }
            report_loader(size, loader, model.get("baseline"), args)
            report(size, results[size], args)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


def report_loader(size, r, model, args):
    """The loader table: CPU ms per clip per core, previous vs current, files and cache; the stages; worker memory;
    and the model-only step per clip beside it (baseline.py, this device)."""
    print(
        f"\n== {size}: loading alone, CPU ms per clip on one core (0 workers, 1 thread; fastest of "
        f"{args.loader_rounds} round(s), {args.clips} clips) =="
    )
    print(f"{'loader':<22}{'train':>8}{'test':>8}{'x previous (train)':>20}")
    for key, v in r["cpu"].items():
        ref = r["cpu"]["previous --cache" if "--cache" in key else "previous"]["train"]
        print(f"{key:<22}{v['train']:>8.2f}{v['test']:>8.2f}{ref / v['train']:>19.2f}x")
    cur, cached = r["cpu"]["current"]["train"], r["cpu"]["current --cache"]["train"]
    print(
        f"current --cache vs current: {cur / cached:.2f}x; current vs previous: "
        f"{r['cpu']['previous']['train'] / cur:.2f}x"
    )
    stages = list(next(iter(r["stages"].values())))
    print(f"{'stages, ms/clip':<22}" + "".join(f"{k:>10}" for k in stages) + f"{'sum':>8}")
    for key, v in r["stages"].items():
        print(f"{key:<22}" + "".join(f"{v[k]:>10.2f}" for k in stages) + f"{sum(v.values()):>8.2f}")
    print(
        "JPEG decode alone, ms per frame: "
        + ", ".join(f"{k} {v:.2f}" for k, v in r["decoders"].items())
        + " (the current loader: simplejpeg; the previous: PIL)"
    )
    print(
        f"the current loader's STFT, on the model's side (CPU, batches of {args.batch_size}): "
        f"{r['model_stft']:.2f} ms per clip (in the model step below; free on a GPU)"
    )
    print("loader worker peak RSS: " + ", ".join(f"{k} {v:.0f} MB" for k, v in r["worker_mb"].items()))
    if model:
        per_clip = 1000 * model["cpu" if args.device == "cpu" else "wall"] / args.batch_size
        print(
            f"model-only step (baseline.py, {args.device}): {per_clip:.1f} ms per clip "
            f"({'CPU' if args.device == 'cpu' else 'wall'}); loader/model = {cur / per_clip:.2f} on one core "
            f"per {args.device} process"
        )


def report(size, r, args):

    b = args.batch_size
    shape = {
        "synthetic": "audio 33x33, frames 1x32x32",
        "cremad": "audio 257x188, frames 1x224x224",
        "vggsound": "audio 129x626, frames 3x224x224",
    }[size]
    print(f"\n== {size} ({shape}; {DATASETS[SIZES[size][0]]['num_classes']} classes in the model-only runs) ==")
    print(
        "data loading alone: "
        + ", ".join(f"{v:.1f} clips/s with {w} workers" for w, v in r["loading_clips_per_s"].items())
        + "; cached: "
        + ", ".join(f"{v:.1f} with {w} workers" for w, v in r["cached_loading_clips_per_s"].items())
    )
    # on a CPU the ratio uses the fastest step's CPU time: on a shared machine other jobs inflate the wall time
    key = "cpu" if args.device == "cpu" else "wall"
    base = r["model"]["baseline"][key] if "baseline" in r["model"] else None
    print(f"{'model step':<12}{'wall ms':>9}{'CPU ms':>9}{'clips/s':>9}{'x baseline':>12}{'peak MB':>9}")
    for m, t in r["model"].items():
        ratio = f"{t[key] / base:.2f}" if base else "-"
        print(
            f"{m:<12}{1000 * t['wall']:>9.0f}{1000 * t['cpu']:>9.0f}{b / t[key]:>9.1f}{ratio:>12}{t['peak_mb']:>9.0f}"
        )
    for m, t in r["e2e"].items():
        share = r["model"][m]["wall"] / t["wall"] if m in r["model"] else float("nan")
        print(
            f"end to end  {m}.py, {r['e2e_workers']} workers: {1000 * t['wall']:.0f} ms/step "
            f"(CPU {1000 * t['cpu']:.0f}), "
            f"{b / t['wall']:.1f} clips/s = {share:.2f} x model-only (wall), peak {t['peak_mb']:.0f} MB"
        )


if __name__ == "__main__":
    main()
