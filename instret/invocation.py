"""How the user started instret, so that a command the tool suggests runs as printed: `instret`
when that name on the PATH is this program, the path as typed otherwise (`.venv/bin/instret`
after the README's first command), `python -m instret` for the module."""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path

from instret.report import one_line

PROGRAM_VARIABLE = "INSTRET_PROGRAM"  # set for the processes of `train --nproc-per-node`, started as a module


def program() -> str:
    """The shell words that start this instret again, from the same folder."""
    inherited = os.environ.get(PROGRAM_VARIABLE)
    if inherited:
        return inherited
    started = sys.argv[0] if sys.argv else ""
    name = Path(started).name
    if name == "__main__.py" and Path(started).resolve().parent == Path(__file__).resolve().parent:  # python -m instret
        return f"{_as_typed('python', sys.executable)} -m instret"
    if name.startswith("instret"):  # the console script
        return _as_typed(name, started)
    return "instret"  # a library call (a notebook, a test): the command as installed


def command_line(*words) -> str:
    """A command to suggest: the program, then each word quoted for the shell where it needs it."""
    return " ".join([program(), *(shlex.quote(one_line(str(w))) for w in words)])


def _as_typed(name: str, path: str) -> str:
    """`name` when the shell finds this very file under it, else the path itself. Paths are
    compared as written, not resolved: a venv's python links to the base one, which would
    not find instret."""
    found = shutil.which(name)
    if found and os.path.abspath(found) == os.path.abspath(path):
        return name
    return shlex.quote(path)
