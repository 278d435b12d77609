"""Each ALGO LOGIC BLOCK as a user meets it: text cut out of its script, from the `# ALGO LOGIC BLOCK` line to the
`# END ALGO LOGIC BLOCK` line. Cut out, it names no undefined name and imports nothing it does not use
(`ruff check --select F821,F401` on it as a file of its own); its header names exactly what its imports bind; and it
runs with nothing but the builtins (conftest.load_block), its imports binding the real modules.
"""

import ast
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import BLOCK_END, BLOCK_START, ROOT, block_imports, block_source, load_block

SCRIPTS = ["ogm.py", "opm.py", "arl.py", "dgl.py", "aug.py", "mmpareto.py", "inforeg.py"]
MODULES = {"torch": torch, "nn": nn, "F": F}


def cut_out(script):
    """The block as a user copies it: its first marker line to its end marker line, both included."""
    with open(os.path.join(ROOT, script)) as f:
        lines = f.read().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(BLOCK_START))
    end = next(i for i, line in enumerate(lines) if line.startswith(BLOCK_END))
    return "\n".join(lines[start : end + 1]) + "\n"


def ruff(path, select):
    """`ruff check --isolated --select <select>` on one file (no project settings, no cache): (exit code, output)."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ruff",
            "check",
            "--isolated",
            "--no-cache",
            "--select",
            select,
            "--output-format",
            "concise",
            str(path),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_block_cut_out_passes_ruff_undefined_and_unused_names(script, tmp_path):
    text = cut_out(script)
    path = tmp_path / f"{script[:-3]}_block.py"
    path.write_text(text)
    code, out = ruff(path, "F821,F401")
    assert code == 0, f"{script}'s block, cut out:\n{out}"
    # the check can fail: without its first import the block has undefined names
    first = next(line for line in text.splitlines() if line.startswith("import "))
    path.write_text(text.replace(first + "\n", "", 1))
    code, out = ruff(path, "F821")
    assert code == 1 and "F821" in out, out


@pytest.mark.parametrize("script", SCRIPTS)
def test_block_header_names_exactly_its_imports(script):
    """The header (the comment lines that open the block) says `Brings its imports (a, b, ...)`, listing the names
    its import statements bind, in their order; load_block binds them to the modules themselves."""
    text = cut_out(script)
    lines = text.splitlines()
    n = next(i for i, line in enumerate(lines) if not line.startswith("#"))
    header = " ".join(line.lstrip("# ") for line in lines[:n])
    m = re.search(r"Brings its imports \(([^)]*)\)", header)
    assert m, f"{script}: the block's header does not say which imports it brings: {header!r}"
    with open(os.path.join(ROOT, script)) as f:
        bound = block_imports(ast.parse(block_source(f.read(), script)), script)
    assert m.group(1).split(", ") == list(bound)
    blk = load_block(script)
    for name in bound:
        assert getattr(blk, name) is MODULES.get(name, sys.modules.get(name)), name


def test_scripts_do_not_import_again_what_their_block_imports():
    """The script's own imports (after the block) hold only what the rest of it needs and the block does not bring
    (ruff's F811 would flag a second `import torch`; this names the rule)."""
    for script in SCRIPTS:
        with open(os.path.join(ROOT, script)) as f:
            text = f.read()
        rest = ast.parse(text[text.index(BLOCK_END) :].split("\n", 1)[1])
        after = {
            n
            for node in rest.body
            if isinstance(node, (ast.Import, ast.ImportFrom))
            for n in (a.asname or a.name.split(".")[0] for a in node.names)
        }
        block = set(block_imports(ast.parse(block_source(text, script)), script))
        assert not after & block, (script, after & block)
