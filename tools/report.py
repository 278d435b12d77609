"""Read every run's results.json under a folder, write <out>/results.md (printed too) and PNG plots.

    python -m tools.report runs/all  # -> runs/report/results.md, test_acc.png, modalities.png, modulation.png
    python -m tools.report runs/all --out somewhere/
    python -m tools.report --study runs/study   # the regime study: one table per regime + weak_branch.png

One row per method (baseline's --modality audio/visual runs get their own rows), mean ± std over seeds of the
best-epoch and last-epoch fused, audio-only and visual-only accuracy and macro-F1, and seconds per epoch.
Runs listed in <runs>/failed.txt (written by run_all.sh) appear as FAILED rows. `aug_trained` is aug.py run with
`--train-new-heads` (its --exp-name). The plots: fused accuracy per epoch, each branch's accuracy per epoch, the
last epoch's fused / audio / visual accuracy per method, and each method's modulation signal.
"""

import argparse
import glob
import json
import os

import numpy as np

from common import cli

ORDER = [
    "baseline",
    "baseline_audio",
    "baseline_visual",
    "ogm",
    "opm",
    "arl",
    "dgl",
    "aug",
    "aug_trained",
    "mmpareto",
    "inforeg",
]
STUDY_REGIMES = ["audio-dominant", "dominant-absent", "weak-absent", "visual-dominant"]  # run_all.sh --study regimes
SIGNAL = {  # what train/coeff_* means for each script (logged metric keys)
    "ogm": "OGM coefficient k",
    "opm": "OPM drop probability q",
    "arl": "ARL weight 1+c",
    "inforeg": "InfoReg pull strength (0: none)",
    "aug": "AUG number of classifiers",
    "aug_trained": "AUG number of classifiers",
    "mmpareto": "MMPareto weight of the fused-loss gradient alpha_m",
}


def method_name(results):
    name = results.get("args", {}).get("exp_name") or results.get("script", "?")  # aug_trained: its --exp-name
    modality = results.get("args", {}).get("modality", "both")
    return f"{name}_{modality}" if modality in ("audio", "visual") else name


def load_runs(runs_dir):
    runs = {}
    for path in sorted(glob.glob(os.path.join(runs_dir, "**", "results.json"), recursive=True)):
        with open(path) as f:
            r = json.load(f)
        metrics_path = os.path.join(os.path.dirname(path), "metrics.jsonl")
        r["history"] = [json.loads(x) for x in open(metrics_path) if x.strip()] if os.path.isfile(metrics_path) else []
        runs.setdefault(method_name(r), []).append(r)
    return runs


def load_failures(runs_dir):
    path = os.path.join(runs_dir, "failed.txt")
    failed = {}
    if os.path.isfile(path):
        for line in open(path):
            parts = line.split()
            if parts:
                failed.setdefault(parts[0], []).append(" ".join(parts[1:]))
    return failed


def mean_std(values, scale=100.0, digits=1):
    vals = [v for v in values if v is not None]
    if not vals:
        return "–"
    m, s = np.mean(vals) * scale, (np.std(vals) * scale if len(vals) > 1 else 0.0)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def sort_key(name):
    return (ORDER.index(name) if name in ORDER else len(ORDER), name)


def table(runs, failed):
    cols = ["best acc", "last acc", "best audio", "last audio", "best visual", "last visual", "best F1", "last F1"]
    keys = [
        "test/acc",
        "test/acc",
        "test/acc_audio",
        "test/acc_audio",
        "test/acc_visual",
        "test/acc_visual",
        "test/macro_f1",
        "test/macro_f1",
    ]
    lines = ["| method | seeds | " + " | ".join(cols) + " | s/epoch |", "|" + "---|" * (len(cols) + 3)]
    for name in sorted(set(runs) | set(failed), key=sort_key):
        rs = runs.get(name, [])
        cells = []
        for col, key in zip(cols, keys):
            which = "best" if col.startswith("best") else "last"
            cells.append(mean_std([r[which].get(key) for r in rs]))
        seeds = ",".join(str(r["seed"]) for r in sorted(rs, key=lambda r: r["seed"])) or "–"
        secs = mean_std([r["seconds_per_epoch"] for r in rs], scale=1.0) if rs else "–"
        lines.append(f"| {name} | {seeds} | " + " | ".join(cells) + f" | {secs} |")
        for f in failed.get(name, []):
            lines.append(f"| {name} | FAILED ({f}) |" + " |" * (len(cols) + 1))
    return "\n".join(lines)


def imbalance(runs):
    """One line per weak branch whose unimodal baseline was run: joint training's branch against the same encoder
    trained alone, last epoch, per seed (the seeds both have)."""
    lines = []
    for modality in ("visual", "audio"):
        joint = {r["seed"]: r["last"].get(f"test/acc_{modality}") for r in runs.get("baseline", [])}
        alone = {r["seed"]: r["last"].get("test/acc") for r in runs.get(f"baseline_{modality}", [])}
        seeds = sorted(s for s in joint if s in alone and joint[s] is not None)
        if not seeds:
            continue
        below = all(joint[s] < alone[s] for s in seeds)
        per_seed = ", ".join(f"seed {s}: {100 * joint[s]:.1f}% vs {100 * alone[s]:.1f}%" for s in seeds)
        gap = 100 * np.mean([alone[s] - joint[s] for s in seeds])
        verdict = (
            f"below in every seed, by {gap:.1f} points on average"
            if below
            else "NOT below in every seed (no imbalance)"
        )
        lines.append(
            f"Imbalance: joint training's {modality} branch against the {modality} encoder trained alone, last epoch "
            f"({per_seed}): {verdict}."
        )
    return lines


def curve(rs, key):
    n = min(len(r["history"]) for r in rs)
    if n == 0 or any(key not in h for r in rs for h in r["history"][:n]):
        return None
    return np.array([[h[key] for h in r["history"][:n]] for r in rs]).mean(0)


def plots(runs, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    names = sorted(runs, key=sort_key)
    colour = {name: f"C{i % 10}" for i, name in enumerate(names)}  # one colour per method in every plot
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for name in names:
        c = curve(runs[name], "test/acc")
        if c is not None:
            ax.plot(np.arange(len(c)), 100 * c, marker="o", ms=3, label=name, color=colour[name])
    ax.set(xlabel="epoch", ylabel="test accuracy (%)", title="Fused test accuracy per epoch (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "test_acc.png"), dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, (key, label) in zip(axes, [("test/acc_audio", "audio"), ("test/acc_visual", "visual")]):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        for name in names:
            c = curve(runs[name], key)
            if c is not None:
                ax.plot(np.arange(len(c)), 100 * c, marker="o", ms=3, label=name, color=colour[name])
        ax.set(xlabel="epoch", ylabel="test accuracy (%)", title=f"{label} branch per epoch (mean over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "branches.png"), dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(7, 1.1 * len(names)), 4.5))
    width = 0.27
    for k, (key, label) in enumerate(
        [("test/acc", "fused"), ("test/acc_audio", "audio"), ("test/acc_visual", "visual")]
    ):
        means, stds = [], []
        for name in names:
            vals = [r["last"][key] for r in runs[name] if key in r["last"]]
            means.append(100 * np.mean(vals) if vals else 0.0)
            stds.append(100 * np.std(vals) if len(vals) > 1 else 0.0)
        ax.bar(np.arange(len(names)) + (k - 1) * width, means, width, yerr=stds, capsize=2, label=label)
    ax.set_xticks(np.arange(len(names)), names, rotation=20, ha="right")
    ax.set(ylabel="last-epoch test accuracy (%)", title="Fused, audio-only and visual-only accuracy per method")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "modalities.png"), dpi=120)
    plt.close(fig)

    signal = [n for n in names if n in SIGNAL and curve(runs[n], "train/coeff_audio") is not None]
    cols = max(1, min(3, len(signal)))
    rows = max(1, int(np.ceil(len(signal) / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, name in zip(axes.flat, signal):
        for key, label in (("train/coeff_audio", "audio"), ("train/coeff_visual", "visual")):
            c = curve(runs[name], key)
            ax.plot(np.arange(len(c)), c, marker="o", ms=3, label=label)
        ax.set(title=f"{name}: {SIGNAL[name]}", xlabel="epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(signal) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "modulation.png"), dpi=120)
    plt.close(fig)


def write_report(runs_dir, out=None):
    out = out or os.path.join(os.path.dirname(os.path.normpath(runs_dir)) or ".", "report")
    os.makedirs(out, exist_ok=True)
    runs, failed = load_runs(runs_dir), load_failures(runs_dir)
    if not runs and not failed:
        raise SystemExit(f"no results.json under {runs_dir}: run a script or run_all.sh first")
    summary = imbalance(runs)
    text = "\n".join(
        [f"Results from `{runs_dir}` (accuracy and macro-F1 in %, mean ± std over seeds)", "", table(runs, failed), ""]
        + [*summary, ""] * bool(summary)
    )
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    if runs:
        plots(runs, out)
    print(text.rstrip().removesuffix("\n".join(summary)).rstrip() + "\n")
    print(f"wrote {out}/results.md" + (", test_acc.png, branches.png, modalities.png, modulation.png" if runs else ""))
    print("\n".join(summary))  # last: what the runs show
    return out


def write_study(study_dir, out=None):
    """The regime study: <out>/study.md with one table per regime (each regime's runs under <study_dir>/<regime>),
    and weak_branch.png: each method's last-epoch fused and weak-branch accuracy per regime."""
    out = out or os.path.join(study_dir, "report")
    os.makedirs(out, exist_ok=True)
    regimes = [r for r in STUDY_REGIMES if os.path.isdir(os.path.join(study_dir, r))]
    if not regimes:
        raise SystemExit(
            f"no regime folders ({', '.join(STUDY_REGIMES)}) under {study_dir}: run "
            "`bash run_all.sh --study regimes` first"
        )
    parts, loaded = [f"Regime study from `{study_dir}` (accuracy and macro-F1 in %, mean ± std over seeds)", ""], {}
    for regime in regimes:
        runs, failed = load_runs(os.path.join(study_dir, regime)), load_failures(os.path.join(study_dir, regime))
        loaded[regime] = runs
        parts += [f"### {regime}", "", table(runs, failed), ""]
    text = "\n".join(parts)
    with open(os.path.join(out, "study.md"), "w") as f:
        f.write(text)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(regimes), figsize=(5.5 * len(regimes), 4.5), squeeze=False, sharey=True)
    for ax, regime in zip(axes[0], regimes):
        runs = loaded[regime]
        names = [n for n in sorted(runs, key=sort_key) if n != "baseline_audio" and n != "baseline_visual"]
        weak = "test/acc_audio" if regime == "visual-dominant" else "test/acc_visual"
        alone = runs.get("baseline_audio" if regime == "visual-dominant" else "baseline_visual", [])
        for k, (key, label) in enumerate([("test/acc", "fused"), (weak, f"weak branch ({weak.split('_')[-1]})")]):
            vals = [[r["last"].get(key) for r in runs[n] if r["last"].get(key) is not None] for n in names]
            ax.bar(
                np.arange(len(names)) + (k - 0.5) * 0.4,
                [100 * np.mean(v) if v else 0 for v in vals],
                0.4,
                yerr=[100 * np.std(v) if len(v) > 1 else 0 for v in vals],
                capsize=2,
                label=label,
            )
        if alone:
            ax.axhline(
                100 * np.mean([r["last"]["test/acc"] for r in alone]),
                color="k",
                ls="--",
                lw=1,
                label="weak modality trained alone",
            )
        ax.set_xticks(np.arange(len(names)), names, rotation=25, ha="right")
        ax.set(title=regime, ylabel="last-epoch test accuracy (%)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "weak_branch.png"), dpi=120)
    plt.close(fig)
    print(text)
    print(f"wrote {out}/study.md, weak_branch.png")
    return out


if __name__ == "__main__":
    p = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # one-line errors
    p.add_argument("runs_dir", nargs="?", default=None, help="folder searched recursively for results.json")
    p.add_argument(
        "--study",
        default=None,
        metavar="STUDY_DIR",
        help="the regime study's folder (run_all.sh --study regimes): one table per regime",
    )
    p.add_argument("--out", default=None, help="output folder (default: runs/report next to runs_dir)")
    a = p.parse_args()
    if a.study:
        cli.require(a.study, "--study", "pass the study's folder (e.g. runs/study)")
        write_study(a.study, a.out)
    else:
        if a.runs_dir is None:
            raise SystemExit("pass the folder holding the run folders (e.g. runs/), or --study runs/study")
        cli.require(a.runs_dir, "runs_dir", "pass the folder holding the run folders (e.g. runs/)")
        write_report(a.runs_dir, a.out)
