"""`instret serve`'s command line (its address, its advice when packages are missing), and the
commands that must start without importing torch."""

import socket
import subprocess
import sys

import pytest

from instret import serve as serve_module
from instret.cli.serve import serve_cmd
from tests.test_cli import run_cli


def test_default_address_is_loopback():
    defaults = {p.name: p.default for p in serve_cmd.params}
    assert defaults["host"] == "127.0.0.1" and defaults["port"] == 8000


@pytest.fixture
def no_uvicorn(monkeypatch):
    """Record what would be served instead of serving."""
    calls = []
    monkeypatch.setattr("uvicorn.run", lambda app, **options: calls.append(options))
    return calls


def test_listening_beyond_loopback_warns(trained_run, no_uvicorn, monkeypatch, capsys):
    monkeypatch.setattr(serve_module, "_free_to_listen", lambda host, port: port)  # binds nothing
    code, out, err = run_cli(["serve", "--index", str(trained_run), "--host", "0.0.0.0"], capsys)
    assert code == 0 and no_uvicorn == [dict(host="0.0.0.0", port=8000, log_level="warning", access_log=False)]
    assert "warning: listening on 0.0.0.0: anyone who can reach this machine" in err
    code, out, err = run_cli(["serve", "--index", str(trained_run)], capsys)
    assert code == 0 and "warning" not in err and "at http://127.0.0.1:8000/" in err


def test_a_taken_port_is_one_clear_line(trained_run, no_uvicorn, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out, err = run_cli(["serve", "--index", str(trained_run), "--port", str(port)], capsys)
    assert code == 1 and err.strip() == f"instret: error: cannot listen on 127.0.0.1:{port}: Address already in use"
    assert no_uvicorn == []


def test_a_missing_index_fails_before_listening(tmp_path, no_uvicorn, capsys):
    code, out, err = run_cli(["serve", "--index", str(tmp_path / "none")], capsys)
    assert code == 1 and "no such index folder" in err and no_uvicorn == []


def test_missing_web_packages_say_what_to_install(trained_run, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn now raises ImportError
    code, out, err = run_cli(["serve", "--index", str(trained_run)], capsys)
    assert code == 1 and err.strip() == (
        "instret: error: instret serve needs Starlette and uvicorn (part of instret's install; missing here): "
        "pip install starlette uvicorn"
    )


def imports_torch(args: list[str]) -> tuple[int, bool]:
    """(exit status, whether torch was imported) of `instret ARGS` in a fresh interpreter."""
    script = (
        "import sys\nfrom instret.cli.main import main\ncode = 0\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
        "    code = e.code or 0\nprint('torch' in sys.modules, file=sys.stderr)\nsys.exit(code)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True)
    return done.returncode, done.stderr.strip().splitlines()[-1] == "True"


def test_help_info_env_and_usage_errors_start_without_torch(trained_run):
    index = str(trained_run / "index")
    assert imports_torch(["--help"]) == (0, False)
    assert imports_torch(["serve", "--help"]) == (0, False)
    assert imports_torch(["info", index]) == (0, False)
    assert imports_torch(["info", index, "--json"]) == (0, False)
    assert imports_torch(["env"]) == (0, False)
    assert imports_torch(["query"]) == (2, False)  # a usage error
    assert imports_torch(["serve", "--index", index, "--port", "x"]) == (2, False)
    assert imports_torch(["info", "/nonexistent"]) == (1, False)
    # A path that is not there is refused before torch is imported, whichever command names it.
    run = str(trained_run)
    for args in (
        ["query", "x.jpg", "--index", index],
        ["query", run + "/photos-gone/a.jpg", "--index", run],
        ["index", "/nonexistent", "--model", run, "--out", "/tmp/unused-instret-index"],
        ["index", str(trained_run.parent / "photos"), "--model", "/nonexistent", "--out", "/tmp/unused-instret-index"],
        ["dups", "/nonexistent"],
        ["serve", "--index", "/nonexistent"],
        ["export", "/nonexistent", "--format", "onnx", "--out", "/tmp/unused.onnx"],
        ["train", "--data", "/nonexistent"],
        ["eval-retrieval", "/nonexistent", "--model", run],
        ["merge-index", "/nonexistent", "--out", "/tmp/unused-instret-index"],
    ):
        assert imports_torch(args) == (1, False), args
    query = str(trained_run.parent / "photos" / "a" / "000.jpg")
    assert imports_torch(["query", query, "--index", index]) == (0, True)  # a search needs the encoder
