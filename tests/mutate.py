"""Mutation check of the method lines: does every line of a method's logic have a test that fails without it?

    python tests/mutate.py ogm            # one method (ogm, opm, arl, dgl, aug, mmpareto)
    python tests/mutate.py all            # the five, one after the other
    python tests/mutate.py ogm --list     # print the mutants, run nothing
    python tests/mutate.py ogm --jobs 1 --timeout 300 --lines 40-60
    python tests/mutate.py arl --match clip -k clipping_in   # some mutants, against some tests

The method lines of a script are its ALGO LOGIC BLOCK (between `# ALGO LOGIC BLOCK` and `# END ALGO LOGIC BLOCK`)
and the statements marked `# ALGO LOGIC` in the rest of it: a marker at the end of a line marks the statement that
line belongs to (a compound statement whole: `if c:  # ALGO LOGIC` marks its body too; a marker inside a
multi-line call marks the call); a marker on a line of its own marks the statements that follow it, up to the next
blank or comment line. Everything is found from the markers, so line numbers never matter.

On those lines the tool makes one mutant per change: a statement replaced by `pass`, a condition negated, a
comparison swapped (< <= > >= == != is in), and/or swapped, a number changed (0 -> 1, 1 -> 0 or 2, n -> n + 1, a
float x -> x + 1 and 2 x), + <-> -, * <-> /, a unary minus dropped, True <-> False, a mode string swapped with its
alternative or misspelt (comparisons, keyword defaults and keyword arguments), max <-> min, `.detach()` dropped, a
decorator dropped, `with torch.no_grad()` -> `with torch.enable_grad()`. Each mutant is written into a private copy
of the repository (the worktree is never modified) and the method's fast tests (TESTS below) run on it with
`pytest -x -q` and a timeout; a failing (or timed-out) run kills the mutant. The survivors are printed with their
line and change: each needs a test, or a reason why it cannot change behaviour (docs/<method>.md, Tests).

Not collected by pytest (not a test_*.py file). At most two processes run mutants at a time (--jobs 1 or 2).
"""

import argparse
import ast
import importlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
import time
import tokenize

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# per method: the test files (lift tests first, then the method's own) and a -k expression that keeps the fast
# tests of those files for this method (the imbalance smoke tests and the subprocess CLI smoke tests are left out)
SLOW = "not imbalance and not smoke_cli"
AMP = "tests/test_amp_gradients.py"  # the gradient surgery under --amp, measured against an unscaled step
LIFT_MLP = "tests/test_lift_mlp.py"  # the blocks on an MLP model with a plain linear head (unequal widths)
TESTS = {  # the release-parity tests last: the script's loop against the release's step (docs/parity.md)
    "ogm": (
        ["tests/test_lift.py", LIFT_MLP, "tests/test_ogm.py", AMP, "tests/test_parity_ogm.py"],
        f"(ogm or block) and {SLOW}",
    ),
    "opm": (
        ["tests/test_lift.py", LIFT_MLP, "tests/test_opm.py", "tests/test_parity_opm.py"],
        f"(opm or block) and {SLOW}",
    ),
    "arl": (
        ["tests/test_lift.py", LIFT_MLP, "tests/test_arl.py", AMP, "tests/test_parity_arl.py"],
        f"(arl or block) and {SLOW}",
    ),
    "dgl": (
        ["tests/test_lift_dgl_aug.py", LIFT_MLP, "tests/test_dgl.py", AMP, "tests/test_parity_dgl.py"],
        f"(dgl or block) and {SLOW}",
    ),
    "aug": (
        ["tests/test_lift_dgl_aug.py", LIFT_MLP, "tests/test_aug.py", AMP, "tests/test_parity_aug.py"],
        f"(aug or aca or block) and {SLOW}",
    ),
    "mmpareto": (["tests/test_mmpareto.py", "tests/test_parity_mmpareto.py", AMP], "mmpareto"),
    "inforeg": (["tests/test_inforeg.py"], f"not ddp and {SLOW}"),  # lift, amp audit and parity are in the file
}

# method lines besides the markers: statements with a line matching one of these (the loops' gradient clipping,
# part of the ARL and DGL recipes: clip 40 in every preset)
EXTRA = {"arl": [r"if args\.clip_grad > 0:"], "dgl": [r"if args\.clip_grad > 0:", r"clip_factor = 1\.0"]}
MARK = re.compile(r"#\s*ALGO LOGIC(?! BLOCK)")
BLOCK_START, BLOCK_END = "# ALGO LOGIC BLOCK", "# END ALGO LOGIC BLOCK"

# mode strings and their alternative (the choices of the scripts' flags); any other string in a comparison or a
# keyword default is misspelt instead
STRING_SWAPS = {
    "half": "full",
    "full": "half",
    "both": "dominant",
    "dominant": "both",
    "unscaled": "scaled",
    "scaled": "unscaled",
    "conv": "nonbias",
    "nonbias": "conv",
    "single-pass": "two-pass",
    "two-pass": "single-pass",
    "mean": "per-modality",
    "per-modality": "none",
    "ensemble": "sum-probs",
    "sum-probs": "ensemble",
    "ratio": "difference",
    "difference": "ratio",
    "previous": "current",
    "current": "previous",
    "computed": "fixed",
    "fixed": "computed",
    "audio": "visual",
    "visual": "audio",
    "ogm_ge": "ogm",
    "ogm": "ogm_ge",
    "none": "ogm",
    "paper": "release",
    "release": "paper",
    "on": "off",
    "off": "on",
    "pytorch1": "pytorch2",
    "pytorch2": "pytorch1",
    "tensor": "global",
    "global": "tensor",
    "mmpareto": "uniform",
    "uniform": "mgda",
    "mgda": "mmpareto",
    "shared": "release",  # (and "release" -> "paper" above: MMPareto's --init release also gets a mutant)
}
COMPARE_SWAPS = {
    ast.Lt: (ast.LtE, ast.GtE),
    ast.LtE: (ast.Lt, ast.Gt),
    ast.Gt: (ast.GtE, ast.LtE),
    ast.GtE: (ast.Gt, ast.Lt),
    ast.Eq: (ast.NotEq,),
    ast.NotEq: (ast.Eq,),
    ast.Is: (ast.IsNot,),
    ast.IsNot: (ast.Is,),
    ast.In: (ast.NotIn,),
    ast.NotIn: (ast.In,),
}
BINOP_SWAPS = {
    ast.Add: ast.Sub,
    ast.Sub: ast.Add,
    ast.Mult: ast.Div,
    ast.Div: ast.Mult,
    ast.FloorDiv: ast.Mult,
    ast.Mod: ast.FloorDiv,
    ast.Pow: ast.Mult,
}
SIMPLE_STATEMENTS = (
    ast.Assign,
    ast.AugAssign,
    ast.AnnAssign,
    ast.Expr,
    ast.Return,
    ast.Continue,
    ast.Break,
    ast.Raise,
    ast.Assert,
    ast.Delete,
)


# ----------------------------------------------------------------------------------------------------------------
# which lines are the method's
# ----------------------------------------------------------------------------------------------------------------
def _statements(tree):
    return [n for n in ast.walk(tree) if isinstance(n, ast.stmt)]


def _siblings(tree):
    """{id(statement): (the list it sits in, its index)} for every statement body of the module."""
    out = {}
    for node in ast.walk(tree):
        for field in ("body", "orelse", "finalbody", "handlers"):
            body = getattr(node, field, None)
            if isinstance(body, list):
                for i, s in enumerate(body):
                    if isinstance(s, ast.stmt):
                        out[id(s)] = (body, i)
    return out


def method_lines(text, extra=()):
    """The set of 1-based line numbers that hold the method's logic (see the module docstring); `extra`: regular
    expressions, a line matching one marks its statement like a marker at the end of it."""
    lines = text.splitlines()
    tree = ast.parse(text)
    starts = [i + 1 for i, line in enumerate(lines) if line.startswith(BLOCK_START)]
    ends = [i + 1 for i, line in enumerate(lines) if line.startswith(BLOCK_END)]
    if len(starts) != 1 or len(ends) != 1 or starts[0] >= ends[0]:
        raise SystemExit("expected one '# ALGO LOGIC BLOCK' line followed by one '# END ALGO LOGIC BLOCK' line")
    marked = set(range(starts[0] + 1, ends[0]))
    stmts, siblings = _statements(tree), _siblings(tree)
    rows = [
        tok.start[0]
        for tok in tokenize.generate_tokens(io.StringIO(text).readline)
        if tok.type == tokenize.COMMENT and MARK.match(tok.string)
    ]
    rows += [i + 1 for i, line in enumerate(lines) if any(re.search(x, line) for x in extra)]
    for row in rows:
        if lines[row - 1].strip().startswith("#"):  # a comment line: the statements that follow, to a gap
            following = [s for s in stmts if s.lineno > row]
            if not following:
                continue
            first = min(following, key=lambda s: (s.lineno, -s.end_lineno))
            body, i = siblings[id(first)]
            last = first.end_lineno
            marked.update(range(first.lineno, first.end_lineno + 1))
            for s in body[i + 1 :]:
                gap = lines[last : s.lineno - 1]
                if any(not g.strip() or g.strip().startswith("#") for g in gap):
                    break
                marked.update(range(s.lineno, s.end_lineno + 1))
                last = s.end_lineno
        else:  # the innermost statement holding the line (a compound statement whole if it is its header line)
            holders = [s for s in stmts if s.lineno <= row <= s.end_lineno]
            inner = min(holders, key=lambda s: s.end_lineno - s.lineno)
            marked.update(range(inner.lineno, inner.end_lineno + 1))
    return marked


# ----------------------------------------------------------------------------------------------------------------
# the mutants: (line, description, mutated source)
# ----------------------------------------------------------------------------------------------------------------
class Source:
    """Splices replacement text into the source at an AST node's position (col offsets are UTF-8 byte offsets)."""

    def __init__(self, text):
        self.text = text
        self.lines = [line.encode() for line in text.splitlines(keepends=True)]

    def segment(self, node):
        return ast.get_source_segment(self.text, node)

    def replace(self, node, new, start=None, end=None):
        (l0, c0), (l1, c1) = start or (node.lineno, node.col_offset), end or (node.end_lineno, node.end_col_offset)
        head = b"".join(self.lines[: l0 - 1]) + self.lines[l0 - 1][:c0]
        tail = self.lines[l1 - 1][c1:] + b"".join(self.lines[l1:])
        return (head + new.encode() + tail).decode()


def _is_docstring(node, parents):
    p = parents.get(id(node))
    return (
        isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
        and p is not None
        and isinstance(p, (ast.Module, ast.FunctionDef, ast.ClassDef))
        and p.body[0] is node
    )


def _number_variants(v):
    if isinstance(v, bool):
        return []
    if isinstance(v, int):
        return [1] if v == 0 else [0, 2] if v == 1 else [v + 1]
    if isinstance(v, float):
        return [x for x in (v + 1.0, v * 2.0) if x != v]
    return []


def mutants(text, lines):
    """Every mutant of `text` on `lines`: a list of (line, description, source, reach), where `reach` is the set of
    lines at least one of which a test must execute for the mutant to change what it sees (the changed node's
    statement: the whole of a simple statement, the header of a compound one)."""
    src, tree = Source(text), ast.parse(text)
    parents = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[id(child)] = node
    docstring_consts = set()
    for node in ast.walk(tree):
        if _is_docstring(node, parents):
            docstring_consts.add(id(node.value))
    inside = [n for n in ast.walk(tree) if hasattr(n, "lineno") and n.lineno in lines and n.end_lineno in lines]
    out = []

    def reach(node):
        stmt = node
        while stmt is not None and not isinstance(stmt, ast.stmt):
            stmt = parents.get(id(stmt))
        if stmt is None:
            return set(range(node.lineno, node.end_lineno + 1))
        if isinstance(stmt, SIMPLE_STATEMENTS):
            return set(range(stmt.lineno, stmt.end_lineno + 1))
        return set(range(min(stmt.lineno, node.lineno), node.end_lineno + 1))

    def add(node, what, new_text, start=None, end=None):
        out.append((node.lineno, what, src.replace(node, new_text, start, end), reach(node)))

    def unparse_with(node, **changes):
        clone = ast.parse(ast.unparse(node), mode="eval").body if isinstance(node, ast.expr) else None
        for k, v in changes.items():
            setattr(clone, k, v)
        return ast.unparse(clone)

    for node in inside:
        seg = src.segment(node) if isinstance(node, (ast.expr, ast.stmt)) else None
        short = (seg or "").split("\n")[0][:60]
        # statements -> pass
        if isinstance(node, SIMPLE_STATEMENTS) and not _is_docstring(node, parents):
            add(node, f"delete `{short}`", "pass")
        # decorators dropped
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            for d in node.decorator_list:
                out.append(
                    (
                        d.lineno,
                        f"drop decorator @{src.segment(d)}",
                        src.replace(d, "(lambda f: f)"),
                        reach(d) | {node.lineno},
                    )
                )
        # conditions negated
        if isinstance(node, (ast.If, ast.While, ast.IfExp)):
            t = node.test
            add(t, f"negate `{src.segment(t)[:60]}`", f"not ({src.segment(t)})")
        # with torch.no_grad() -> torch.enable_grad()
        if isinstance(node, ast.With):
            for item in node.items:
                if src.segment(item.context_expr) == "torch.no_grad()":
                    add(item.context_expr, "torch.no_grad() -> torch.enable_grad()", "torch.enable_grad()")
        # comparisons
        if isinstance(node, ast.Compare):
            for i, op in enumerate(node.ops):
                for alt in COMPARE_SWAPS.get(type(op), ()):
                    ops = list(node.ops)
                    ops[i] = alt()
                    new = unparse_with(node, ops=ops)
                    add(node, f"`{short}` -> `{new[:60]}`", new)
        if isinstance(node, ast.BoolOp):
            alt = ast.Or() if isinstance(node.op, ast.And) else ast.And()
            new = unparse_with(node, op=alt)
            add(node, f"`{short}` -> `{new[:60]}`", new)
        if isinstance(node, ast.BinOp) and type(node.op) in BINOP_SWAPS:
            new = unparse_with(node, op=BINOP_SWAPS[type(node.op)]())
            add(node, f"`{short}` -> `{new[:60]}`", f"({new})")
        if isinstance(node, ast.AugAssign) and type(node.op) in BINOP_SWAPS:
            clone = ast.parse(ast.unparse(node)).body[0]
            clone.op = BINOP_SWAPS[type(node.op)]()
            add(node, f"`{short}` -> `{ast.unparse(clone)[:60]}`", ast.unparse(clone))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.Not)):
            add(node, f"drop the unary operator of `{short}`", f"({src.segment(node.operand)})")
        # constants
        if isinstance(node, ast.Constant) and id(node) not in docstring_consts:
            v = node.value
            if isinstance(v, bool):
                add(node, f"{v} -> {not v}", str(not v))
            for alt in _number_variants(v):
                add(node, f"{src.segment(node)} -> {alt!r}", repr(alt))
            if isinstance(v, str) and _string_is_logic(node, parents):
                for alt in {STRING_SWAPS.get(v), v + "_mutant"} - {None}:
                    add(node, f"{v!r} -> {alt!r}", repr(alt))
        # calls: max <-> min, .detach() dropped
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name) and f.id in ("max", "min"):
                alt = "min" if f.id == "max" else "max"
                add(f, f"{f.id}( -> {alt}( in `{short}`", alt)
            if isinstance(f, ast.Attribute) and f.attr == "detach" and not node.args:
                add(node, f"drop .detach() in `{short}`", f"({src.segment(f.value)})")
    seen, unique = {text}, []
    for line, what, new, lines_reached in out:
        if new in seen:
            continue
        try:
            ast.parse(new)
        except SyntaxError:
            continue
        seen.add(new)
        unique.append((line, what, new, lines_reached))
    return sorted(unique, key=lambda m: m[0])


def _string_is_logic(node, parents):
    """A mode string: an operand of a comparison, a keyword default of a def, or a keyword argument's value."""
    p = parents.get(id(node))
    if isinstance(p, ast.Compare):
        return True
    if isinstance(p, ast.arguments):
        return node in p.defaults or node in p.kw_defaults
    return isinstance(p, ast.keyword)


# ----------------------------------------------------------------------------------------------------------------
# running them
# ----------------------------------------------------------------------------------------------------------------
# How a pass stays short. (1) Which tests can see a mutant: the unmutated tests run once under a line tracer that
# records, per test, the lines of the script it executes (its own and those of the fixtures it uses; lines run while
# the test files are imported count for every test, and a test that starts a subprocess counts as running every
# line). A test that never executes a mutant's statement cannot tell the mutant from the original, so only the tests
# that do are run on it, fastest first, stopping at the first failure. (2) No interpreter start-up per mutant: this
# process imports torch, torchvision and pytest once and forks one child per mutant, which runs pytest in-process in
# its own copy of the repository (the script, the tests and `common` are imported fresh by the child).
IGNORE = shutil.ignore_patterns(".git", "runs", "data", "__pycache__", ".ruff_cache", ".pytest_cache", "*.pyc")
HEAVY = ("torch", "torchvision", "numpy", "cv2", "PIL.Image", "pytest")


def make_copy(base):
    dst = os.path.join(base, "repo")
    shutil.copytree(ROOT, dst, ignore=IGNORE)
    return dst


class LineTracer:
    """A pytest plugin: the lines of one file executed by each test (and its fixtures), and each test's seconds."""

    def __init__(self, path):
        self.path = path
        self.stack = [set()]  # the bottom set: lines run outside any test (importing the test files)
        self.fixtures, self.tests, self.seconds, self.spawns = {}, {}, {}, set()
        self.current = None

    def _local(self, frame, event, arg):
        if event == "line":
            self.stack[-1].add(frame.f_lineno)
        return self._local

    def _global(self, frame, event, arg):
        if frame.f_code.co_filename != self.path:
            return None
        self.stack[-1].add(frame.f_lineno)
        return self._local

    def start(self):
        import subprocess as sp
        import threading

        tracer, popen_init = self, sp.Popen.__init__

        def init(popen, *a, **kw):  # a test that starts a process may run any line there, untraced
            if tracer.current:
                tracer.spawns.add(tracer.current)
            popen_init(popen, *a, **kw)

        sp.Popen.__init__ = init
        sys.settrace(self._global)
        threading.settrace(self._global)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_fixture_setup(self, fixturedef, request):
        self.stack.append(set())
        yield
        lines = self.stack.pop()
        self.fixtures.setdefault(fixturedef.argname, set()).update(lines)
        self.stack[-1].update(lines)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        self.current = item.nodeid
        self.stack.append(set())
        yield
        lines = self.stack.pop()
        for name in item.fixturenames:
            lines |= self.fixtures.get(name, set())
        self.tests[item.nodeid] = sorted(lines)
        self.current = None

    def pytest_runtest_logreport(self, report):
        self.seconds[report.nodeid] = self.seconds.get(report.nodeid, 0.0) + report.duration


def _child(repo, args, log, plugin=None):
    """In a forked child: run pytest on `args` inside `repo`; never returns."""
    code = 3
    try:
        os.setpgid(0, 0)  # its own process group, so a timeout also stops the loader workers it started
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.chdir(repo)
        here = os.path.dirname(os.path.abspath(__file__))
        sys.path[:] = [repo] + [p for p in sys.path if p not in (here, ROOT, "")]
        sys.dont_write_bytecode = True
        if plugin is not None:
            plugin.start()
        code = int(
            pytest.main(
                [
                    "-x",
                    "-q",
                    "-p",
                    "no:cacheprovider",
                    "-p",
                    "no:randomly",
                    "--basetemp",
                    os.path.join(os.path.dirname(repo), "pt"),
                    *args,
                ],
                plugins=[plugin] if plugin is not None else [],
            )
        )
        if plugin is not None:
            sys.settrace(None)
            with open(log + ".json", "w") as f:
                json.dump(
                    {
                        "import": sorted(plugin.stack[0]),
                        "tests": plugin.tests,
                        "seconds": plugin.seconds,
                        "spawns": sorted(plugin.spawns),
                    },
                    f,
                )
    except BaseException:  # noqa: BLE001 (a child must never return into the parent's loop)
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class Slot:
    """One private copy of the repository and at most one child running the tests in it."""

    def __init__(self, base):
        self.base, self.repo = base, make_copy(base)
        self.pid = None

    def start(self, script, text, args, timeout, plugin=None):
        with open(os.path.join(self.repo, script), "w") as f:
            f.write(text)
        self.log = os.path.join(self.base, "log")
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(self.repo, args, self.log, plugin)
        self.pid, self.t0, self.deadline = pid, time.time(), time.time() + timeout if timeout else None

    def poll(self):
        """None while running, else (status, seconds, log tail)."""
        pid, wstatus = os.waitpid(self.pid, os.WNOHANG)
        if pid == 0:
            if self.deadline is None or time.time() < self.deadline:
                return None
            try:
                os.killpg(self.pid, 9)
            except ProcessLookupError:
                pass
            os.waitpid(self.pid, 0)
            status = "timeout"
        else:
            try:
                os.killpg(self.pid, 9)  # leftovers of the child's group
            except (ProcessLookupError, PermissionError):
                pass
            code = os.waitstatus_to_exitcode(wstatus)
            status = "pass" if code == 0 else "fail"
        self.pid = None
        with open(self.log, errors="replace") as f:
            tail = f.read()[-4000:]
        return status, time.time() - self.t0, tail


def trace_tests(slot, script, text, method):
    """Run the method's tests on the unmutated script under the line tracer: (test ids in run order, {test: set of
    lines it can reach}, {test: seconds}, lines run at import, wall seconds)."""
    files, expr = TESTS[method]
    files = [f for f in files if os.path.exists(os.path.join(slot.repo, f))]
    plugin = LineTracer(os.path.join(slot.repo, script))
    slot.start(script, text, ["-k", expr, *files], None, plugin)
    while (res := slot.poll()) is None:
        time.sleep(0.2)
    status, secs, log = res
    if status != "pass":
        print(log)
        raise SystemExit(f"{method}: the tests fail on the unmutated tree; fix them first")
    with open(slot.log + ".json") as f:
        info = json.load(f)
    everything = set(range(1, len(text.splitlines()) + 1))
    reach = {t: everything if t in info["spawns"] else set(lines) for t, lines in info["tests"].items()}
    return list(info["tests"]), reach, info["seconds"], set(info["import"]), secs


def selection(mutant_reach, order, reach, seconds, at_import):
    """The tests that execute a mutant's statement, fastest first (all of them if it runs at import)."""
    chosen = order if mutant_reach & at_import else [t for t in order if reach[t] & mutant_reach]
    return sorted(chosen, key=lambda t: seconds.get(t, 0.0))


def check(method, jobs, timeout, line_range, verbose, match=None):
    script = f"{method}.py"
    with open(os.path.join(ROOT, script)) as f:
        text = f.read()
    lines = method_lines(text, EXTRA.get(method, ()))
    if line_range:
        lines &= line_range
    todo = [m for m in mutants(text, lines) if not match or re.search(match, m[1])]
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix=f"mutate_{method}_") as tmp:
        slots = []
        for i in range(jobs):
            os.makedirs(os.path.join(tmp, str(i)))
            slots.append(Slot(os.path.join(tmp, str(i))))
        order, reach, seconds, at_import, secs = trace_tests(slots[0], script, text, method)
        limit = timeout or max(60.0, 3 * secs)
        print(
            f"{method}: {len(todo)} mutants on {len(lines)} method lines; {len(order)} tests, unmutated run "
            f"{secs:.0f} s (traced), timeout {limit:.0f} s, {jobs} process(es)",
            flush=True,
        )
        results, queue, running = [], list(enumerate(todo)), {}
        while queue or running:
            for slot in slots:
                if slot.pid is None and queue:
                    i, m = queue.pop(0)
                    tests = selection(m[3], order, reach, seconds, at_import)
                    if not tests:  # no test executes this statement
                        results.append((i, m[0], m[1], "unreached", 0.0, 0))
                        print(
                            f"  [{len(results)}/{len(todo)}] line {m[0]}: {m[1]}: SURVIVED (no test runs it)",
                            flush=True,
                        )
                        continue
                    slot.start(script, m[2], tests, limit)
                    running[id(slot)] = (i, m, len(tests))
            for slot in slots:
                if slot.pid is None:
                    continue
                res = slot.poll()
                if res is None:
                    continue
                st, s, _ = res
                with open(os.path.join(slot.repo, script), "w") as f:
                    f.write(text)
                i, m, n = running.pop(id(slot))
                results.append((i, m[0], m[1], st, s, n))
                if verbose or st == "pass":
                    mark = "SURVIVED" if st == "pass" else st
                    print(
                        f"  [{len(results)}/{len(todo)}] line {m[0]}: {m[1]}: {mark} ({s:.0f} s, {n} tests)", flush=True
                    )
            time.sleep(0.05)
    wall = time.time() - t0
    results.sort()
    survivors = [(line, what) for _, line, what, st, *_ in results if st in ("pass", "unreached")]
    timeouts = sum(r[3] == "timeout" for r in results)
    return {
        "method": method,
        "tried": len(results),
        "killed": len(results) - len(survivors),
        "timeouts": timeouts,
        "survivors": survivors,
        "wall": wall,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("method", choices=sorted(TESTS) + ["all"])
    p.add_argument("--jobs", type=int, default=2, choices=[1, 2], help="processes running mutants (at most 2)")
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds per mutant run (default: 3x the unmutated run, at least 60)",
    )
    p.add_argument("--lines", default=None, help="only mutants on these lines (e.g. 40-60, or 28,33,40-42)")
    p.add_argument("--match", default=None, help="only mutants whose description matches this regular expression")
    p.add_argument("-k", dest="k", default=None, help="pytest -k expression replacing the method's test selection")
    p.add_argument("--list", action="store_true", help="print the method lines' mutants and exit")
    p.add_argument("-v", "--verbose", action="store_true", help="print every mutant's outcome")
    args = p.parse_args(argv)
    rng = None
    if args.lines:  # "40-60" or "28,33,40-42"
        rng = set()
        for part in args.lines.split(","):
            lo, _, hi = part.partition("-")
            rng |= set(range(int(lo), int(hi or lo) + 1))
    methods = sorted(TESTS) if args.method == "all" else [args.method]
    if args.list:
        for method in methods:
            with open(os.path.join(ROOT, f"{method}.py")) as f:
                text = f.read()
            lines = method_lines(text, EXTRA.get(method, ()))
            if rng:
                lines &= rng
            ms = [m for m in mutants(text, lines) if not args.match or re.search(args.match, m[1])]
            print(f"{method}: {len(ms)} mutants on lines {_ranges(lines)}")
            for line, what, *_ in ms:
                print(f"  line {line}: {what}")
        return
    if args.k:
        for m in methods:
            TESTS[m] = (TESTS[m][0], args.k)
    # the children inherit these: one thread each, and the heavy imports done once here, before any fork
    os.environ.update(OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    os.environ.pop("BML_TRACE_DIR", None)
    for name in HEAVY:
        importlib.import_module(name)
    reports = [check(m, args.jobs, args.timeout, rng, args.verbose, args.match) for m in methods]
    print("\n| method | mutants | killed | survived | timeouts | wall |\n|---|---|---|---|---|---|")
    for r in reports:
        print(
            f"| {r['method']} | {r['tried']} | {r['killed']} | {len(r['survivors'])} | {r['timeouts']} | "
            f"{r['wall']:.0f} s |"
        )
    for r in reports:
        if r["survivors"]:
            print(f"\n{r['method']} survivors:")
            for line, what in r["survivors"]:
                print(f"  {r['method']}.py:{line}: {what}")


def _ranges(lines):
    out, run = [], []
    for n in sorted(lines):
        if run and n != run[-1] + 1:
            out.append(run)
            run = []
        run.append(n)
    if run:
        out.append(run)
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in out)


if __name__ == "__main__":
    try:
        main()
    except BrokenPipeError:  # `... --list | head`
        sys.stderr.close()
