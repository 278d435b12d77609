"""Each method page's "Use it in your own project" section is a complete example: its python code blocks, run in
order as one file from the project root (a subprocess fed the code on stdin, so the root is on sys.path as it is
for a script saved there), train the page's stand-in model for a few steps and exit 0, so the page cannot drift
from the code. The section's counts ("adds N lines", "an M-line adapter") are those of its code: the lines marked
`# +` in the loop and the code lines of the block that starts with `# adapter`.
"""

import os
import re
import subprocess
import sys

import pytest
from conftest import HANG, ROOT

PAGES = ["ogm", "opm", "arl", "dgl", "aug", "mmpareto", "inforeg"]
SECTION = "## Use it in your own project\n"


def section(page):
    with open(os.path.join(ROOT, "docs", f"{page}.md")) as f:
        text = f.read()
    assert text.count(SECTION) == 1, f"docs/{page}.md: expected one '{SECTION.strip()}' section"
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    return text[start : end if end >= 0 else len(text)]


def python_blocks(text):
    return re.findall(r"^```python\n(.*?)^```$", text, re.S | re.M)


def code_lines(block):
    return [line for line in block.splitlines() if line.strip() and not line.strip().startswith("#")]


@pytest.mark.parametrize("page", PAGES)
def test_docs_snippet_runs_from_the_project_root(page):
    blocks = python_blocks(section(page))
    assert len(blocks) == 3, f"docs/{page}.md: expected the stand-in, the adapter and the loop, got {len(blocks)}"
    code = "\n\n".join(blocks)
    assert f"from {page} import " in code  # the page's own block, imported from the script (or pasted)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)  # only what a user has: the project root as the working directory
    proc = subprocess.run(
        [sys.executable, "-"], input=code, capture_output=True, text=True, cwd=ROOT, env=env, timeout=HANG
    )
    assert proc.returncode == 0, f"docs/{page}.md, 'Use it in your own project':\n{proc.stderr[-3000:]}"
    lines = proc.stdout.splitlines()
    assert [line.split(":")[0] for line in lines[:3]] == ["epoch 0", "epoch 1", "epoch 2"], proc.stdout
    acc = float(re.search(r"training-set accuracy ([0-9.]+)", lines[-1]).group(1))
    assert acc > 0.5, proc.stdout  # it trained (chance is 0.25)


@pytest.mark.parametrize("page", PAGES)
def test_docs_snippet_counts_are_those_of_its_code(page):
    text = section(page)
    blocks = python_blocks(text)
    adapter = [b for b in blocks if b.startswith("# adapter")]
    assert len(adapter) == 1, f"docs/{page}.md: expected one code block starting with '# adapter'"
    added = sum(1 for line in blocks[-1].splitlines() if re.search(r"# \+(\s|$)", line))
    said_added = re.search(r"adds \*\*(\d+) lines\*\* to a plain training loop \(marked `# \+`", text)
    said_adapter = re.search(r"\*\*(\d+)-line adapter\*\*", text)
    assert said_added and said_adapter, f"docs/{page}.md: the counts sentence is missing"
    assert int(said_added.group(1)) == added
    assert int(said_adapter.group(1)) == len(code_lines(adapter[0]))
