"""User errors: one line on stderr that names the flag or path and says what to do, a non-zero exit, no traceback.

Ranges are declared on the flags themselves: `p.add_argument("--alpha", type=at_least(0), ...)`. A value out of
range, an unknown flag or an invalid choice ends the run in argparse with exit status 2 and one line,
`ogm.py: error: --alpha must be >= 0, got -1.0 (see --help)`, without the usage block (`--help` prints it).
A problem found later (a missing folder, an unreadable checkpoint) raises `SystemExit(message)`: Python prints the
message alone and exits with status 1. Standard library only, so the preprocess tools use it too.
"""

import argparse
import math
import os
import re


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `<prog>: error: <message> (see --help)`, exit status 2."""

    def error(self, message):
        # argparse says "argument --alpha: must be ..." for a range type below: say "--alpha must be ..."
        message = re.sub(r"^argument ([-\w/]+): must be ", lambda m: f"{m.group(1).split('/')[0]} must be ", message)
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def number(kind, ok, want):
    """An argparse type: `kind(text)` (int or float) that must be finite and satisfy `ok`, else `must be <want>`."""

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {'an integer' if kind is int else 'a number'}, got {text!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {want}, got {value}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its own messages
    return parse


def positive(kind=float):
    return number(kind, lambda x: x > 0, "positive")


def at_least(lo, kind=float, why=""):
    return number(kind, lambda x: x >= lo, f">= {lo}{why}")


def between(lo, hi, kind=float, why=""):
    return number(kind, lambda x: lo <= x <= hi, f"in [{lo}, {hi}]{why}")


def check(args, name, ok, want):
    """Exit with `--<name> must be <want>, got <value>` unless `ok(value)` holds and the value is finite. A value of
    None passes; for a list-valued flag (nargs) every element is checked. For flags checked after parsing."""
    value = getattr(args, name)
    if value is None:
        return
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    for v in values:
        if isinstance(v, float) and not math.isfinite(v):
            raise SystemExit(f"--{name.replace('_', '-')} must be a finite number, got {v}")
    if not all(ok(v) for v in values):
        shown = " ".join(map(str, values)) if isinstance(value, (list, tuple)) else value
        raise SystemExit(f"--{name.replace('_', '-')} must be {want}, got {shown}")


def require(path, flag, what, kind="dir"):
    """Exit with `<flag> <path>: not found; <what>` unless `path` is an existing folder (kind "dir") or file."""
    if not (os.path.isdir(path) if kind == "dir" else os.path.isfile(path)):
        raise SystemExit(f"{flag} {path}: {'folder' if kind == 'dir' else 'file'} not found; {what}")
