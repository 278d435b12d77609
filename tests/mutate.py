"""Mutation check of the method lines: does every line of a method's logic have a test that fails without it?

    python tests/mutate.py ogm            # one method (ogm, opm, arl, dgl, aug)
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
import concurrent.futures
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tokenize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# per method: the test files (lift tests first, then the method's own) and a -k expression that keeps the fast
# tests of those files for this method (the imbalance smoke tests and the subprocess CLI smoke tests are left out)
SLOW = "not imbalance and not smoke_cli"
TESTS = {
    "ogm": (["tests/test_lift.py", "tests/test_ogm.py"], f"(ogm or block) and {SLOW}"),
    "opm": (["tests/test_lift.py", "tests/test_opm.py"], f"(opm or block) and {SLOW}"),
    "arl": (["tests/test_lift.py", "tests/test_arl.py"], f"(arl or block) and {SLOW}"),
    "dgl": (["tests/test_lift_dgl_aug.py", "tests/test_dgl.py"], f"(dgl or block) and {SLOW}"),
    "aug": (["tests/test_lift_dgl_aug.py", "tests/test_aug.py", "tests/test_aug_mutants.py"],
            f"(aug or aca or block) and {SLOW}"),
}

# method lines besides the markers: statements with a line matching one of these (the loops' gradient clipping,
# part of the ARL and DGL recipes: clip 40 in every preset)
EXTRA = {"arl": [r"if args\.clip_grad > 0:"], "dgl": [r"if args\.clip_grad > 0:", r"clip_factor = 1\.0"]}
MARK = re.compile(r"#\s*ALGO LOGIC(?! BLOCK)")
BLOCK_START, BLOCK_END = "# ALGO LOGIC BLOCK", "# END ALGO LOGIC BLOCK"

# mode strings and their alternative (the choices of the scripts' flags); any other string in a comparison or a
# keyword default is misspelt instead
STRING_SWAPS = {"half": "full", "full": "half", "both": "dominant", "dominant": "both", "unscaled": "scaled",
                "scaled": "unscaled", "conv": "nonbias", "nonbias": "conv", "single-pass": "two-pass",
                "two-pass": "single-pass", "mean": "per-modality", "per-modality": "none", "ensemble": "sum-probs",
                "sum-probs": "ensemble", "ratio": "difference", "difference": "ratio", "previous": "current",
                "current": "previous", "computed": "fixed", "fixed": "computed", "audio": "visual", "visual": "audio",
                "ogm_ge": "ogm", "ogm": "ogm_ge", "none": "ogm"}
COMPARE_SWAPS = {ast.Lt: (ast.LtE, ast.GtE), ast.LtE: (ast.Lt, ast.Gt), ast.Gt: (ast.GtE, ast.LtE),
                 ast.GtE: (ast.Gt, ast.Lt), ast.Eq: (ast.NotEq,), ast.NotEq: (ast.Eq,), ast.Is: (ast.IsNot,),
                 ast.IsNot: (ast.Is,), ast.In: (ast.NotIn,), ast.NotIn: (ast.In,)}
BINOP_SWAPS = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Mult,
               ast.Mod: ast.FloorDiv, ast.Pow: ast.Mult}
SIMPLE_STATEMENTS = (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Expr, ast.Return, ast.Continue, ast.Break,
                     ast.Raise, ast.Assert, ast.Delete)


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
    rows = [tok.start[0] for tok in tokenize.generate_tokens(io.StringIO(text).readline)
            if tok.type == tokenize.COMMENT and MARK.match(tok.string)]
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
            for s in body[i + 1:]:
                gap = lines[last:s.lineno - 1]
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
        head = b"".join(self.lines[:l0 - 1]) + self.lines[l0 - 1][:c0]
        tail = self.lines[l1 - 1][c1:] + b"".join(self.lines[l1:])
        return (head + new.encode() + tail).decode()


def _is_docstring(node, parents):
    p = parents.get(id(node))
    return (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
            and p is not None and isinstance(p, (ast.Module, ast.FunctionDef, ast.ClassDef)) and p.body[0] is node)


def _number_variants(v):
    if isinstance(v, bool):
        return []
    if isinstance(v, int):
        return [1] if v == 0 else [0, 2] if v == 1 else [v + 1]
    if isinstance(v, float):
        return [x for x in (v + 1.0, v * 2.0) if x != v]
    return []


def mutants(text, lines):
    """Every mutant of `text` on `lines`: a list of (line, description, source)."""
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

    def add(node, what, new_text, start=None, end=None):
        out.append((node.lineno, what, src.replace(node, new_text, start, end)))

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
                out.append((d.lineno, f"drop decorator @{src.segment(d)}", src.replace(d, "(lambda f: f)")))
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
    for line, what, new in out:
        if new in seen:
            continue
        try:
            ast.parse(new)
        except SyntaxError:
            continue
        seen.add(new)
        unique.append((line, what, new))
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
IGNORE = shutil.ignore_patterns(".git", "runs", "data", "__pycache__", ".ruff_cache", ".pytest_cache", "*.pyc")


def make_copy(base):
    dst = os.path.join(base, "repo")
    shutil.copytree(ROOT, dst, ignore=IGNORE)
    return dst


def run_tests(repo, method, timeout):
    """(status, seconds): status 'pass', 'fail' or 'timeout' of the method's fast tests in the copy `repo`."""
    files, expr = TESTS[method]
    files = [f for f in files if os.path.exists(os.path.join(repo, f))]
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--basetemp",
           os.path.join(os.path.dirname(repo), "pt"), "-k", expr, *files]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1", PYTHONPATH=repo)
    env.pop("BML_TRACE_DIR", None)
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.time() - t0, ""
    status = "pass" if proc.returncode == 0 else "fail"
    return status, time.time() - t0, proc.stdout[-2000:] + proc.stderr[-2000:]


class Worker:
    def __init__(self, base):
        self.repo = make_copy(base)

    def run(self, script, new_text, method, timeout):
        path = os.path.join(self.repo, script)
        with open(os.path.join(ROOT, script)) as f:
            original = f.read()
        with open(path, "w") as f:
            f.write(new_text)
        try:
            return run_tests(self.repo, method, timeout)
        finally:
            with open(path, "w") as f:
                f.write(original)


def check(method, jobs, timeout, line_range, verbose, match=None):
    script = f"{method}.py"
    with open(os.path.join(ROOT, script)) as f:
        text = f.read()
    lines = method_lines(text, EXTRA.get(method, ()))
    if line_range:
        lines &= set(range(line_range[0], line_range[1] + 1))
    todo = [m for m in mutants(text, lines) if not match or re.search(match, m[1])]
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix=f"mutate_{method}_") as tmp:
        workers = []
        for i in range(jobs):
            os.makedirs(os.path.join(tmp, str(i)))
            workers.append(Worker(os.path.join(tmp, str(i))))
        status, secs, log = workers[0].run(script, text, method, None)  # the unmutated tree must pass
        if status != "pass":
            print(log)
            raise SystemExit(f"{method}: the tests fail on the unmutated tree; fix them first")
        limit = timeout or max(60.0, 3 * secs)
        print(f"{method}: {len(todo)} mutants on {len(lines)} method lines; unmutated tests {secs:.0f} s, "
              f"timeout {limit:.0f} s, {jobs} process(es)", flush=True)
        free = list(workers)
        results = []
        with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
            pending = {}
            queue = list(enumerate(todo))
            while queue or pending:
                while queue and free:
                    i, m = queue.pop(0)
                    w = free.pop()
                    pending[pool.submit(w.run, script, m[2], method, limit)] = (i, m, w)
                done, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
                for fut in done:
                    i, m, w = pending.pop(fut)
                    free.append(w)
                    st, s, _ = fut.result()
                    results.append((i, m[0], m[1], st, s))
                    if verbose or st == "pass":
                        mark = "SURVIVED" if st == "pass" else st
                        print(f"  [{len(results)}/{len(todo)}] line {m[0]}: {m[1]}: {mark} ({s:.0f} s)", flush=True)
    wall = time.time() - t0
    results.sort()
    survivors = [(line, what) for _, line, what, st, _ in results if st == "pass"]
    timeouts = sum(st == "timeout" for *_, st, _ in results)
    return {"method": method, "tried": len(results), "killed": len(results) - len(survivors), "timeouts": timeouts,
            "survivors": survivors, "wall": wall}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("method", choices=sorted(TESTS) + ["all"])
    p.add_argument("--jobs", type=int, default=2, choices=[1, 2], help="processes running mutants (at most 2)")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds per mutant run (default: 3x the unmutated run, at least 60)")
    p.add_argument("--lines", default=None, help="only mutants on lines A-B (e.g. 40-60)")
    p.add_argument("--match", default=None, help="only mutants whose description matches this regular expression")
    p.add_argument("-k", dest="k", default=None, help="pytest -k expression replacing the method's test selection")
    p.add_argument("--list", action="store_true", help="print the method lines' mutants and exit")
    p.add_argument("-v", "--verbose", action="store_true", help="print every mutant's outcome")
    args = p.parse_args(argv)
    rng = tuple(int(x) for x in args.lines.split("-")) if args.lines else None
    methods = sorted(TESTS) if args.method == "all" else [args.method]
    if args.list:
        for method in methods:
            with open(os.path.join(ROOT, f"{method}.py")) as f:
                text = f.read()
            lines = method_lines(text, EXTRA.get(method, ()))
            if rng:
                lines &= set(range(rng[0], rng[1] + 1))
            ms = [m for m in mutants(text, lines) if not args.match or re.search(args.match, m[1])]
            print(f"{method}: {len(ms)} mutants on lines {_ranges(lines)}")
            for line, what, _ in ms:
                print(f"  line {line}: {what}")
        return
    if args.k:
        for m in methods:
            TESTS[m] = (TESTS[m][0], args.k)
    reports = [check(m, args.jobs, args.timeout, rng, args.verbose, args.match) for m in methods]
    print("\n| method | mutants | killed | survived | timeouts | wall |\n|---|---|---|---|---|---|")
    for r in reports:
        print(f"| {r['method']} | {r['tried']} | {r['killed']} | {len(r['survivors'])} | {r['timeouts']} | "
              f"{r['wall']:.0f} s |")
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
