"""Generator-sensitivity table: the weak (visual) branch's lift over joint training, per method, set and seed.

    python -m tools.sensitivity reference=runs/sens/ref "noise 1.5=runs/sens/noise15"

Each argument is LABEL=FOLDER, a folder of runs (run_all.sh --out) on one variation of the generator or schedule.
A cell is the last-epoch visual accuracy of a method minus joint training's (baseline.py) on the same seed, in
points, one number per seed; the visual-alone row (baseline.py --modality visual) is the ceiling, measured the same
way. The joint row gives joint training's own visual accuracy. Read in docs/results.md, "Sensitivity to the
generator".
"""

import argparse

from tools.report import load_runs, sort_key

ROWS = ["baseline_visual", "ogm", "opm", "arl", "dgl", "aug", "aug_trained"]
NAMES = {
    "baseline": "joint training: visual branch (%)",
    "baseline_visual": "visual encoder alone",
    "ogm": "OGM-GE",
    "opm": "OPM",
    "arl": "ARL",
    "dgl": "DGL",
    "aug": "AUG (as released)",
    "aug_trained": "AUG `--train-new-heads`",
}


def visual(run):
    """Last-epoch visual accuracy of a run: its visual branch, or its only branch for --modality visual."""
    key = "test/acc" if run.get("args", {}).get("modality") == "visual" else "test/acc_visual"
    return run["last"].get(key)


def lifts(runs):
    """{method: {seed: lift in points}} against joint training's visual branch on the same seed; and joint's own."""
    joint = {r["seed"]: visual(r) for r in runs.get("baseline", [])}
    out = {"baseline": {s: 100 * v for s, v in joint.items() if v is not None}}
    for name, rs in runs.items():
        if name == "baseline":
            continue
        ok = [r for r in rs if r["seed"] in joint and visual(r) is not None]
        per_seed = {r["seed"]: 100 * (visual(r) - joint[r["seed"]]) for r in ok}
        if per_seed:
            out[name] = per_seed
    return out


def cell(per_seed, signed=True):
    if not per_seed:
        return "–"
    fmt = "{:+.1f}" if signed else "{:.1f}"
    return ", ".join(fmt.format(per_seed[s]) for s in sorted(per_seed))


def table(sets):
    """sets: [(label, folder)] -> the markdown table."""
    data = [(label, lifts(load_runs(folder))) for label, folder in sets]
    lines = ["| method | " + " | ".join(label for label, _ in data) + " |", "|---" * (len(data) + 1) + "|"]
    names = ["baseline"] + sorted({n for _, d in data for n in d if n in ROWS}, key=sort_key)
    for name in names:
        cells = [cell(d.get(name, {}), signed=name != "baseline") for _, d in data]
        lines.append(f"| {NAMES.get(name, name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_set(text):
    label, sep, folder = text.partition("=")
    if not sep or not label or not folder:
        raise argparse.ArgumentTypeError(f"expected LABEL=FOLDER, got {text!r}")
    return label, folder


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sets", nargs="+", type=parse_set, metavar="LABEL=FOLDER", help="a folder of runs and its column")
    args = p.parse_args(argv)
    print(table(args.sets))


if __name__ == "__main__":
    main()
