"""The program name in the commands instret suggests: as the user started it."""

import os
import sys
from pathlib import Path

import pytest

import instret
from instret import invocation


@pytest.fixture
def started(monkeypatch, tmp_path):
    """Pretend instret was started as argv[0] with this PATH."""
    monkeypatch.delenv(invocation.PROGRAM_VARIABLE, raising=False)
    script = tmp_path / "venv" / "bin" / "instret"
    script.parent.mkdir(parents=True)
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)

    def start(argv0: str, path: str = "/usr/bin") -> str:
        monkeypatch.setattr(sys, "argv", [argv0])
        monkeypatch.setenv("PATH", path)
        return invocation.program()

    return script, start


def test_a_console_script_on_the_path_is_named_by_its_name(started):
    script, start = started
    assert start(str(script), str(script.parent)) == "instret"  # the shell passes the full path it found


def test_a_console_script_not_on_the_path_is_named_by_the_path_typed(started, monkeypatch, tmp_path):
    script, start = started
    monkeypatch.chdir(tmp_path)
    assert start("venv/bin/instret") == "venv/bin/instret"  # the README's `.venv/bin/instret train`
    # Another instret first on the PATH is not this one: the path still.
    other = tmp_path / "other"
    other.mkdir()
    (other / "instret").write_text("#!/bin/sh\n")
    (other / "instret").chmod(0o755)
    assert start(str(script), str(other)) == str(script)


def test_the_module_is_named_with_its_python(started, monkeypatch):
    script, start = started
    main = str(Path(instret.__file__).parent / "__main__.py")
    assert start(main, "/nonexistent") == f"{sys.executable} -m instret"
    assert start(main, str(Path(sys.executable).parent)) in ("python -m instret", f"{sys.executable} -m instret")
    # Another program's __main__.py (python -m pytest) is not instret's: the installed name.
    assert start(str(Path(pytest.__file__).parent / "__main__.py")) == "instret"


def test_processes_of_one_launch_take_the_launchers_name(started, monkeypatch):
    script, start = started
    monkeypatch.setenv(invocation.PROGRAM_VARIABLE, ".venv/bin/instret")
    assert start(str(Path(instret.__file__).parent / "__main__.py")) == ".venv/bin/instret"


def test_words_are_quoted_for_the_shell(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["pytest"])
    monkeypatch.delenv(invocation.PROGRAM_VARIABLE, raising=False)
    line = invocation.command_line("query", "my photos/a b.jpg", "--index", Path("runs/x"))
    assert line == "instret query 'my photos/a b.jpg' --index runs/x"
    assert os.path.basename(sys.argv[0]) == "pytest"
