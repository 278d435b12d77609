"""Shared fixtures: a tiny synthetic dataset (CREMA-D layout), helpers that run a script in a subprocess or in
this process, and `load_block`, which lifts a script's ALGO LOGIC BLOCK out on its own."""

import ast
import builtins
import glob
import json
import os
import runpy
import shutil
import subprocess
import sys
import tempfile
import types

# one OpenMP thread per process unless the caller chose otherwise: the suite runs two pytest-xdist workers and
# subprocess runs on 2 cores, and more threads than cores makes the scripts crawl (set before torch is imported)
os.environ.setdefault("OMP_NUM_THREADS", "1")
# blocks of 1 MB and more straight from and back to the OS: without it glibc keeps the memory of the in-process runs'
# models and checkpoints, and an xdist worker grew to 6-12 GB over the suite (read by the workers and subprocesses,
# which inherit it; this process started without it)
os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "1048576")

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the timeout of a test's subprocess: a hang, never a slow machine (the whole suite takes 17 minutes on 2 cores beside
# several training jobs), so that no result depends on the machine's load
HANG = 3600
sys.path.insert(0, ROOT)

from common.synthetic import generate  # noqa: E402

# the metric vocabulary every method script logs (docs/baseline.md); methods with a per-modality coefficient add
# COEFF_KEYS (train/coeff_audio, train/coeff_visual: what each means is in tools/report.py SIGNAL)
METRIC_KEYS = ["train/loss", "train/loss_audio", "train/loss_visual", "train/ratio", "test/acc", "test/acc_audio"]
METRIC_KEYS += ["test/acc_visual", "test/macro_f1", "test/map", "charts/lr", "charts/samples_per_sec"]
COEFF_KEYS = ["train/coeff_audio", "train/coeff_visual"]


@pytest.hookimpl(tryfirst=True)  # before pytest's tmp_path factory reads the option
def pytest_configure(config):
    """A temporary folder of this run's own (unless --basetemp names one): pytest's default, /tmp/pytest-of-<user>/
    pytest-<N>, keeps only the newest three runs, so a run started meanwhile elsewhere on the machine deleted this
    run's folders under it (a test that failed only on a busy machine)."""
    if config.option.basetemp is None and not hasattr(config, "workerinput"):  # xdist workers get theirs from here
        config.option.basetemp = config._bml_basetemp = tempfile.mkdtemp(prefix="bml-tests-")


def pytest_unconfigure(config):
    if getattr(config, "_bml_basetemp", None):
        shutil.rmtree(config._bml_basetemp, ignore_errors=True)


@pytest.fixture(autouse=True)
def _free_disk(request):
    """Delete each test's tmp_path when it ends: every run writes ~0.2 GB checkpoints (two ResNet18s + momentum)."""
    yield
    path = request.node.funcargs.get("tmp_path")
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _free_disk_at_the_end(tmp_path_factory):
    """Delete this session's temporary folder when the suite ends: module-scoped fixtures (e.g. the torchrun runs of
    test_distributed.py) keep their checkpoints until then, several GB per suite run otherwise left in /tmp."""
    yield
    shutil.rmtree(tmp_path_factory.getbasetemp(), ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A --data-root holding synthetic/ with 24 train and 12 test clips (seconds to write)."""
    root = tmp_path_factory.mktemp("data")
    generate(str(root / "synthetic"), n_train=24, n_test=12)
    return str(root)


def tiny_flags(data_root, runs_dir, extra):
    """The flags of a tiny test run: the synthetic set at data_root, runs under runs_dir, batch 4, then `extra`."""
    tiny = ["--dataset", "synthetic", "--data-root", data_root, "--runs-dir", runs_dir, "--no-progress"]
    return [str(x) for x in (*tiny, "--batch-size", 4, *extra)]


def run_script(script, data_root, runs_dir, *extra, check=True):
    """Run `python <script> --dataset synthetic ...` tiny; return (completed process, run folder or None)."""
    cmd = [sys.executable, os.path.join(ROOT, script), *tiny_flags(data_root, runs_dir, extra)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    runs = sorted(glob.glob(os.path.join(str(runs_dir), "*")), key=os.path.getmtime)
    return proc, (runs[-1] if runs else None)


def run_inproc(script, data_root, runs_dir, *extra):
    """`python <script> --dataset synthetic ... --batch-size 4 <extra>` in this process with runpy (the same code path,
    without an interpreter start-up); returns the newest run folder. A non-zero exit is raised."""
    argv = [script, *tiny_flags(data_root, runs_dir, extra)]
    old, sys.argv = sys.argv, argv
    try:
        runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    except SystemExit as e:  # --stop-after-epochs and --eval-only exit with 0
        if e.code not in (0, None):
            raise
    finally:
        sys.argv = old
    return sorted(glob.glob(os.path.join(str(runs_dir), "*")), key=os.path.getmtime)[-1]


def torchrun(driver, jobs_json):
    """`torchrun --standalone --nproc_per_node=2 tests/<driver> <jobs_json>` (one thread per process); a failure is
    raised with the end of its output."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += [os.path.join(ROOT, "tests", driver), str(jobs_json)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=HANG)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")


def make_optimizer(args, params):
    """The optimizer the scripts build from their flags: SGD with momentum 0.9 or AdamW, with --weight-decay."""
    if args.optimizer == "sgd":
        return torch.optim.SGD(params, args.lr, momentum=0.9, weight_decay=args.weight_decay)
    return torch.optim.AdamW(params, args.lr, weight_decay=args.weight_decay)


def ckpt(run_dir, name="last.pt"):
    """A checkpoint of a run folder, loaded on the CPU."""
    return torch.load(os.path.join(run_dir, name), map_location="cpu", weights_only=False)


def history(run_dir):
    """The rows of a run's metrics.jsonl, one per epoch."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def same_state(sd1, sd2):
    """Two state dicts hold the same keys and bitwise equal tensors."""
    return sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)


def read_results(run_dir):
    with open(os.path.join(run_dir, "results.json")) as f:
        return json.load(f)


# ----------------------------------------------------------------------------------------------------------------
# the ALGO LOGIC BLOCK of a method script, executed on its own
# ----------------------------------------------------------------------------------------------------------------
BLOCK_START, BLOCK_END = "# ALGO LOGIC BLOCK", "# END ALGO LOGIC BLOCK"
# what a block may import (its own import statements, at its top): torch and its submodules, and these modules of
# the standard library; nothing of this project, no other package, nothing that loads or runs code
BLOCK_IMPORTS = (
    "torch",
    "math",
    "copy",
    "contextlib",
    "functools",
    "itertools",
    "collections",
    "dataclasses",
    "typing",
)


def block_source(text, name="<block>"):
    """The lines strictly between the one `# ALGO LOGIC BLOCK...` line and the one `# END ALGO LOGIC BLOCK` line."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(BLOCK_START)]
    ends = [i for i, line in enumerate(lines) if line.startswith(BLOCK_END)]
    if len(starts) != 1 or len(ends) != 1 or starts[0] >= ends[0]:
        pytest.fail(
            f"{name}: expected one '{BLOCK_START}...' line followed by one '{BLOCK_END}' line, found "
            f"{len(starts)} start and {len(ends)} end marker(s) (start line(s) {[i + 1 for i in starts]}, "
            f"end line(s) {[i + 1 for i in ends]})",
            pytrace=False,
        )
    return "\n".join(lines[starts[0] + 1 : ends[0]]) + "\n"


def import_bindings(node):
    """{bound name: module} of one import statement (`import torch.nn.functional as F` binds F; `import torch.nn`
    binds torch)."""
    if isinstance(node, ast.ImportFrom):
        return {a.asname or a.name: f"{node.module}.{a.name}" for a in node.names}
    return {a.asname or a.name.split(".")[0]: a.name if a.asname else a.name.split(".")[0] for a in node.names}


def _bound_names(tree):
    """Every name the block itself binds anywhere (defs, classes, arguments, assignments, loop and with targets,
    imports; scopes ignored, so this is an over-approximation)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            names.add(node.id)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= set(import_bindings(node))
    return names


def block_imports(tree, name="<block>"):
    """{bound name: module} of the block's import statements. They must come first (before any other statement),
    at module level, and import only torch (or a submodule) or one of BLOCK_IMPORTS' standard-library modules."""
    body_imports = []
    for node in tree.body:
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            break
        body_imports.append(node)
    bound = {}
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        what = ", ".join(a.name for a in node.names)
        if isinstance(node, ast.ImportFrom):
            what = f"from {node.module or '.' * node.level} import {what}"
        else:
            what = f"import {what}"
        if node not in body_imports:
            pytest.fail(
                f"{name}, line {node.lineno}: '{what}' is not at the top of the ALGO LOGIC BLOCK; a block "
                "starts with all of its imports",
                pytrace=False,
            )
        if isinstance(node, ast.ImportFrom):
            modules = ["." * node.level + (node.module or "")]  # a relative import names no allowed module
        else:
            modules = [a.name for a in node.names]
        for module in modules:
            if not (module.split(".")[0] == "torch" or module in BLOCK_IMPORTS):
                pytest.fail(
                    f"{name}, line {node.lineno}: the ALGO LOGIC BLOCK imports {module!r} ({what}); it may "
                    f"import only torch and {sorted(BLOCK_IMPORTS[1:])}",
                    pytrace=False,
                )
        bound.update(import_bindings(node))
    return bound


def exec_block(source, name="<block>"):
    """Execute block source in a namespace holding nothing but the builtins (the block's own import statements
    bring torch and the rest); return the namespace as an object (`blk.ogm_coefficients(...)`). Fails on an import
    that is not at the block's top or not of torch / BLOCK_IMPORTS, on `__import__`/`importlib`/`exec`/`eval`, and
    on any name the block reads but neither binds nor finds among the builtins (so a block that leans on the rest of
    its script fails here, not only when the offending line happens to run)."""
    try:
        tree = ast.parse(source, filename=name)
    except SyntaxError as e:
        pytest.fail(f"{name}: the ALGO LOGIC BLOCK does not parse on its own: {e}", pytrace=False)
    block_imports(tree, name)
    loads = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    attrs = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}  # (`model.eval()` is fine)
    for forbidden in ("__import__", "importlib", "exec", "eval", "compile", "globals", "__builtins__"):
        if forbidden in loads or (forbidden.startswith("__") and forbidden in attrs):
            pytest.fail(f"{name}: the ALGO LOGIC BLOCK uses {forbidden}", pytrace=False)
    free = loads - _bound_names(tree) - set(dir(builtins))
    if free:
        pytest.fail(
            f"{name}: the ALGO LOGIC BLOCK reads names it neither imports nor defines: {sorted(free)} (only "
            "the builtins are there before its own imports)",
            pytrace=False,
        )
    namespace = {"__builtins__": builtins, "__name__": f"algo_block[{name}]"}
    exec(compile(tree, name, "exec"), namespace)
    return types.SimpleNamespace(**{k: v for k, v in namespace.items() if not k.startswith("__")})


def load_block(script_name):
    """The ALGO LOGIC BLOCK of ROOT/<script_name> (e.g. "ogm.py"), executed without the rest of the script: a test
    that uses only what this returns shows that the block works when copied into another project."""
    path = os.path.join(ROOT, script_name)
    with open(path) as f:
        text = f.read()
    first = next(i for i, line in enumerate(text.splitlines()) if line.startswith(BLOCK_START)) + 1
    # padded so that the block's lines keep their line numbers in the script (tracebacks, tests/mutate.py)
    return exec_block("\n" * first + block_source(text, script_name), path)
