"""The README's first command on a fresh copy of the project, then every `next:` line that
`instret train` prints, typed exactly as printed: each must exit 0.

The fresh virtual environment sees only what the base install brings (instret's dependencies
and theirs, linked from the suite's environment, offline and fast), so a command that needs a
package the first install leaves out fails here as it would for a new user."""

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVE_PORT = 8000  # serve's default: the printed line names no port


def readme_first_command() -> list[str]:
    """The steps of the README's first command (its first indented line)."""
    line = next(x for x in (ROOT / "README.md").read_text().splitlines() if x.startswith("    "))
    return [step.strip() for step in line.split("&&")]


def link_base_install(into: Path) -> None:
    """Links to every distribution `pip install -e .` would bring, found in this environment:
    instret's dependencies and, recursively, theirs (extras left out)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    # instret's own requirements as installed; those of an extra carry a marker and are left out below.
    todo, seen = [Requirement(r) for r in metadata.requires("instret")] + [Requirement("setuptools")], set()
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
            continue
        seen.add(name)
        dist = metadata.distribution(req.name)
        for top in {f.parts[0] for f in dist.files or [] if f.parts[0] != ".."}:  # ".." : scripts in bin/
            link = into / top
            if not os.path.lexists(link):
                link.symlink_to(dist.locate_file(top))
        todo += [Requirement(r) for r in dist.requires or []]


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.mark.slow
def test_every_next_line_of_the_first_command_runs_as_printed(tmp_path):
    if not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to copy its tracked files")
    clone = tmp_path / "instret"
    tracked = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    for rel in filter(None, tracked.decode().split("\0")):
        if (ROOT / rel).is_file():
            (clone / rel).parent.mkdir(parents=True, exist_ok=True)
            (clone / rel).write_bytes((ROOT / rel).read_bytes())
    # (tracked files and new ones not ignored: what a commit of this tree holds)
    # The shell of a new user: no instret on the PATH (the suite's own environment left out).
    path = os.pathsep.join(d for d in os.environ["PATH"].split(os.pathsep) if not (Path(d) / "instret").exists())
    env = {**os.environ, "PATH": path, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONPATH": ""}
    env.pop("VIRTUAL_ENV", None)
    shell = lambda line, **kw: subprocess.run(["bash", "-c", line], cwd=clone, env=env, **kw)

    make_venv, install, train = readme_first_command()
    assert (make_venv, install, train) == (
        "python3 -m venv .venv",
        ".venv/bin/pip install -e .",
        ".venv/bin/instret train",
    )
    assert shell(make_venv).returncode == 0
    version = shell(".venv/bin/python -c 'import sys; print(*sys.version_info[:2])'", capture_output=True, text=True)
    if version.stdout.split() != [str(v) for v in sys.version_info[:2]]:
        pytest.skip(f"python3 here is {version.stdout.strip()}, not the suite's Python: its packages cannot be reused")
    site = next((clone / ".venv" / "lib").glob("python*/site-packages"))
    deps = tmp_path / "base-install"
    deps.mkdir()
    link_base_install(deps)
    # First on the path: the linked setuptools (pyproject asks >= 68) before the venv's own older one,
    # as pip's build isolation would fetch it.
    (site / "base-install.pth").write_text(f"import sys; sys.path.insert(0, {str(deps)!r})\n")
    # The README's install, offline: the packages are those linked above.
    done = shell(f"{install} --no-deps --no-build-isolation --no-index -q", capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    done = shell(f"{train} --epochs 1", capture_output=True, text=True)  # the digits; one epoch prints the same lines
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stderr.split("\nnext:\n")[1].splitlines()
    suggested = [line.strip() for line in lines if line.startswith("  ")]
    assert [s.split()[:2] for s in suggested] == [[".venv/bin/instret", c] for c in ("query", "serve", "plot")]

    for line in suggested:
        if line.split()[1] != "serve":
            done = shell(line, capture_output=True, text=True)
            assert done.returncode == 0, (line, done.stderr[-2000:])
            continue
        if not port_is_free(SERVE_PORT):
            pytest.skip(f"port {SERVE_PORT}, which the printed serve line listens on, is taken here")
        server = subprocess.Popen(
            ["bash", "-c", line], cwd=clone, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        try:
            first = server.stderr.readline()
            assert re.search(rf"at http://127\.0\.0\.1:{SERVE_PORT}/", first), first
            deadline = time.monotonic() + 60
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{SERVE_PORT}/api/v1/health", timeout=5) as r:
                        assert r.status == 200
                        break
                except OSError:
                    assert time.monotonic() < deadline and server.poll() is None, "serve did not come up"
                    time.sleep(0.3)
            os.killpg(server.pid, signal.SIGINT)  # Ctrl-C, which the line says stops it
            assert server.wait(timeout=30) == 0, server.stderr.read()
        finally:
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGKILL)
    assert (clone / "page.html").is_file() and next((clone / "runs").glob("*/curves.png"))
