"""User errors: one line on stderr that names the flag or path and says what to do, a non-zero exit, no traceback.

Every check raises `SystemExit(message)`: Python prints the message alone and exits with status 1. Command-line
syntax errors (unknown flag, a value of the wrong type, an invalid choice) keep argparse's message and exit status
2, without the usage block (`--help` prints it). Standard library only, so the preprocess tools can use it too.
"""

import argparse
import math
import os


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `<prog>: error: <argparse's message> (see --help)`, exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def check(args, name, ok, want):
    """Exit with `--<name> must be <want>, got <value>` unless `ok(value)` holds and the value is finite. A value of
    None (left to the preset) passes; for a list-valued flag (nargs) every element is checked."""
    value = getattr(args, name)
    if value is None:
        return
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not all((not isinstance(v, float) or math.isfinite(v)) and ok(v) for v in values):
        shown = " ".join(map(str, values)) if isinstance(value, (list, tuple)) else value
        raise SystemExit(f"--{name.replace('_', '-')} must be {want}, got {shown}")


def require(path, flag, what, kind="dir"):
    """Exit with `<flag> <path>: not found; <what>` unless `path` is an existing folder (kind "dir") or file."""
    if not (os.path.isdir(path) if kind == "dir" else os.path.isfile(path)):
        raise SystemExit(f"{flag} {path}: {'folder' if kind == 'dir' else 'file'} not found; {what}")
