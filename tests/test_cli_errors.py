"""User errors: a missing dataset, a value out of range, an impossible combination of flags each end in one line that
names the path or the flag, with a non-zero exit and no traceback, before any data is loaded or model built."""

import os
import runpy
import subprocess
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT

import ogm
from common import flags
from common.data import build_datasets, make_loaders
from preprocess import cremad, kinetics_sounds, vggsound

# the docs' command of each script (README.md, docs/<method>.md), run without its dataset
CARDS = {
    "baseline.py": (["--dataset", "cremad"], "cremad"),
    "ogm.py": (["--dataset", "cremad", "--alpha", "0.8"], "cremad"),
    "opm.py": (["--dataset", "cremad"], "cremad"),
    "arl.py": (["--dataset", "cremad", "--data-root", "data"], "cremad"),
    "dgl.py": (["--dataset", "ks"], "kinetics_sounds"),
    "aug.py": (["--dataset", "cremad", "--data-root", "data"], "cremad"),
    "mmpareto.py": (["--dataset", "cremad"], "cremad"),
    "inforeg.py": (["--dataset", "cremad"], "cremad"),
}


def one_line(proc):
    assert proc.returncode != 0, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


@pytest.mark.parametrize("script", sorted(CARDS))
def test_card_command_without_the_dataset(script, tmp_path):
    argv, subdir = CARDS[script]
    proc = subprocess.run(
        [sys.executable, script, *argv, "--data-root", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    line = one_line(proc)
    assert str(tmp_path / subdir) in line and "not found" in line and "--data-root" in line
    assert not os.listdir(tmp_path)  # nothing written


def test_run_all_without_the_dataset(tmp_path):
    proc = subprocess.run(
        ["bash", "run_all.sh", "--dataset", "cremad", "--data-root", str(tmp_path), "--out", str(tmp_path / "out")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert str(tmp_path / "cremad") in one_line(proc)


def user_error(script, *argv, data_root, capsys):
    """Run `python <script> --dataset cremad --data-root <empty> <argv>` in this process; return its one-line error:
    argparse's (a range or an invalid combination of flags: exit status 2, the line on stderr) or a SystemExit
    message (exit status 1). The empty data root makes a check that does not fire end at the dataset instead."""
    old, sys.argv = sys.argv, [script, "--dataset", "cremad", "--data-root", str(data_root), *map(str, argv)]
    capsys.readouterr()
    try:
        runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    except SystemExit as e:
        if e.code == 2:
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith(f"{script}: error: ") and "(see --help)" in err[0], err
            return err[0]
        assert isinstance(e.code, str), f"exit {e.code!r} without a message"
        assert "\n" not in e.code, e.code
        return e.code
    finally:
        sys.argv = old
    raise AssertionError(f"{script} {' '.join(map(str, argv))} did not exit")


CASES = [  # (script, flags, text the one-line error must contain)
    # shared flags (common/flags.py)
    ("baseline.py", ["--epochs", 0], "--epochs must be positive"),
    ("baseline.py", ["--batch-size", -4], "--batch-size must be positive"),
    ("baseline.py", ["--lr", "nan"], "--lr must be a finite number, got nan"),
    ("baseline.py", ["--lr", "abc"], "--lr must be a number, got 'abc'"),
    ("baseline.py", ["--lr-gamma", 0], "--lr-gamma"),
    ("baseline.py", ["--lr-milestones", 5, -1], "--lr-milestones must be >= 0, got -1"),
    ("baseline.py", ["--weight-decay", -0.1], "--weight-decay"),
    ("baseline.py", ["--clip-grad", -1], "--clip-grad"),
    ("baseline.py", ["--seed", -1], "--seed"),
    ("baseline.py", ["--num-workers", -1], "--num-workers"),
    ("baseline.py", ["--max-steps", -1], "--max-steps"),
    ("baseline.py", ["--stop-after-epochs", -1], "--stop-after-epochs"),
    ("baseline.py", ["--n-frames", 0], "--n-frames"),
    ("baseline.py", ["--frame-size", 0], "--frame-size"),
    ("baseline.py", ["--audio-seconds", 0], "--audio-seconds"),
    ("baseline.py", ["--cache-frame-side", -1], "--cache-frame-side"),
    ("baseline.py", ["--device", "nodevice"], "--device nodevice"),
    ("baseline.py", ["--eval-only"], "--eval-only needs --checkpoint"),
    ("baseline.py", ["--checkpoint", "x.pt"], "--checkpoint is read only with --eval-only"),
    ("baseline.py", ["--eval-only", "--checkpoint", "x.pt", "--resume", "x"], "--resume"),
    ("baseline.py", ["--resume", "nowhere"], "--resume nowhere"),
    ("baseline.py", ["--in-memory", "--cache"], "--in-memory"),
    ("baseline.py", ["--in-memory", "--audio-pipeline", "fbank"], "--in-memory"),
    ("baseline.py", ["--persistent-workers", "--num-workers", 0], "--persistent-workers"),
    # OGM
    ("ogm.py", ["--alpha", -1], "--alpha must be >= 0"),
    ("ogm.py", ["--ratio-offset", 2], "--ratio-offset"),
    ("ogm.py", ["--warmup-epochs", -1], "--warmup-epochs"),
    ("ogm.py", ["--modulation-starts", 60], "--modulation-starts 60 is after --modulation-ends 50"),
    ("ogm.py", ["--modulation", "ogm", "--ge-target", "dominant"], "--ge-target"),
    ("ogm.py", ["--fusion", "film"], "argument --fusion: invalid choice: 'film'"),
    # OPM
    ("opm.py", ["--q-base", 1.5], "--q-base must be in [0, 1], got 1.5"),
    ("opm.py", ["--p-exe", -0.1], "--p-exe must be in [0, 1], got -0.1"),
    ("opm.py", ["--lam", -1], "--lam"),
    ("opm.py", ["--warmup-epochs", -1], "--warmup-epochs"),
    ("opm.py", ["--opm-window", 5, 2], "--opm-window 5 2"),
    ("opm.py", ["--opm-window", 0, 3], "--opm-window ends at epoch 3, before --warmup-epochs 6"),
    # ARL
    ("arl.py", ["--T", -1], "--temperature must be >= 0"),
    ("arl.py", ["--gamma", -1], "--gamma"),
    ("arl.py", ["--entropy-floor", 0.6], "--entropy-floor"),
    ("arl.py", ["--select-after", 99], "--select-after 99"),
    ("arl.py", ["--fusion", "film"], "argument --fusion: invalid choice: 'film'"),
    # DGL
    ("dgl.py", ["--alpha", 0], "--alpha must be positive"),
    ("dgl.py", ["--gated-release-quirk"], "--gated-release-quirk needs --fusion gated"),
    ("dgl.py", ["--fusion", "film"], "argument --fusion: invalid choice: 'film'"),
    # AUG
    ("aug.py", ["--lam-res", 1.5], "--lam-res"),
    ("aug.py", ["--merge-alpha", -0.1], "--merge-alpha"),
    ("aug.py", ["--aca-sigma", -1], "--aca-sigma"),
    ("aug.py", ["--aca-tau", -1], "--aca-tau"),
    ("aug.py", ["--aca-check-every", 0], "--aca-check-every"),
    ("aug.py", ["--max-classifiers", -1], "--max-classifiers"),
    ("aug.py", ["--fusion", "gated"], "unrecognized arguments: --fusion gated"),
    # MMPareto
    ("mmpareto.py", ["--gamma", 0], "--gamma must be positive, got 0.0"),
    ("mmpareto.py", ["--rescale", "layer"], "argument --rescale: invalid choice: 'layer'"),
    ("mmpareto.py", ["--combine", "uniform", "--gamma", 2], "--gamma and --rescale shape MMPareto's combination"),
    ("mmpareto.py", ["--combine", "mgda", "--rescale", "global"], "which --combine mgda does not use"),
    ("baseline.py", ["--no-save", "--resume", "x"], "--resume"),
    ("opm.py", ["--fusion", "film"], "argument --fusion: invalid choice: 'film'"),
]


@pytest.mark.parametrize("script, flags, text", CASES, ids=[f"{c[0]}{' '.join(map(str, c[1]))}" for c in CASES])
def test_range_and_combination_errors(script, flags, text, tmp_path, capsys):
    message = user_error(script, *flags, data_root=tmp_path, capsys=capsys)
    assert text in message, message


def test_cuda_without_cuda(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert "--device cuda" in user_error("baseline.py", "--device", "cuda", data_root=tmp_path, capsys=capsys)


def test_unreadable_checkpoint(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")
    message = user_error("ogm.py", "--eval-only", "--checkpoint", bad, data_root=tmp_path, capsys=capsys)
    assert f"{bad}: not a readable checkpoint" in message


def test_argparse_errors_are_one_line(capsys):
    for argv in (["--alpha", "abc"], ["--fusion", "xyz"], ["--no-such-flag"]):
        with pytest.raises(SystemExit) as e:
            ogm.parse_args(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "error:" in err[0] and argv[0] in err[0], err


def test_preprocess_inputs_are_checked_first(tmp_path):
    cases = [
        (kinetics_sounds, ["--videos", str(tmp_path / "v"), "--splits", str(tmp_path)], "--videos"),
        (kinetics_sounds, ["--videos", str(tmp_path), "--splits", str(tmp_path)], "my_train.txt"),
        (vggsound, ["--videos", str(tmp_path), "--csv", str(tmp_path / "x.csv")], "--csv"),
        (cremad, ["--src", str(tmp_path), "--splits", str(tmp_path)], "--splits"),  # before any conversion
        (cremad, ["--src", str(tmp_path), "--workers", "0"], "--workers"),
    ]
    for module, argv, text in cases:
        with pytest.raises(SystemExit, match=text):
            module.main(argv + ["--out", str(tmp_path / "out")])
    assert not os.path.exists(tmp_path / "out")


def data_args(*argv):
    return flags.parser("doc", "x.py").parse_args(list(argv))


def loader_args(num_workers):
    return SimpleNamespace(batch_size=2, num_workers=num_workers, pin_memory="auto", persistent_workers=False)


def usable_cpus():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def test_default_workers_fit_the_machine_without_a_pytorch_warning():
    args = data_args("--dataset", "cremad", "--in-memory", "--frame-size", "16")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train, test, _ = build_datasets(args)
        loader, _ = make_loaders(train, test, loader_args(args.num_workers), torch.Generator())
        next(iter(loader))
    assert args.num_workers == min(4, usable_cpus())
    assert not [w for w in caught if "worker" in str(w.message)], [str(w.message) for w in caught]


def test_more_workers_than_cpus_are_kept_with_one_note(capsys):
    n = usable_cpus() + 1
    args = data_args("--dataset", "cremad", "--in-memory", "--frame-size", "16", "--num-workers", str(n))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train, test, _ = build_datasets(args)
        loader, _ = make_loaders(train, test, loader_args(args.num_workers), torch.Generator())
        next(iter(loader))
    assert args.num_workers == n
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--num-workers {n}" in err[0], err
    assert not [w for w in caught if "worker" in str(w.message)]


def test_check_skips_preset_values_and_lists_every_element():
    from common.cli import check

    check(SimpleNamespace(alpha=None), "alpha", lambda x: x >= 0, ">= 0")  # left to the preset
    with pytest.raises(SystemExit, match=r"^--lr must be a finite number, got inf$"):
        check(SimpleNamespace(lr=float("inf")), "lr", lambda x: x > 0, "positive")


CHECK_IMPORTS = """
import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit:
    pass
slow = ("torch._dynamo", "torch._inductor", "torchvision", "torch.utils.tensorboard")
print(sorted(m for m in slow if m in sys.modules))
"""


@pytest.mark.parametrize("script", sorted(CARDS))
@pytest.mark.parametrize("argv", [["--epochs", "0"], ["--dataset", "cremad"]], ids=["range", "path"])
def test_an_error_comes_before_the_slow_imports(script, argv, tmp_path):
    """A flag or path error ends the run before torch._dynamo and inductor (imported by torchvision: about 1 s), the
    rest of torchvision and TensorBoard are imported: only --compile asks for the compiler, and only after the checks
    are the model and the logger built (README, "Errors and valid ranges"; the latency is measured, not timed here)."""
    cmd = [sys.executable, "-c", CHECK_IMPORTS, script, *argv, "--data-root", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout + proc.stderr
