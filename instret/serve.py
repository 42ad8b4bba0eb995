"""Running the search server (`instret serve`): the address checked, then uvicorn, in one process
or in several workers that each hold the encoder and the index."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import sys
from pathlib import Path

from instret.defaults import QUERY_DEVICE, SERVE_HOST, SERVE_MAX_UPLOAD_MB, SERVE_PORT, SERVE_WORKERS
from instret.errors import InstretError

SETTINGS_VARIABLE = "INSTRET_SERVE_SETTINGS"  # how worker processes receive the settings


def serve(
    index_dir: str | Path,
    host: str = SERVE_HOST,
    port: int = SERVE_PORT,
    workers: int = SERVE_WORKERS,
    max_upload_mb: float = SERVE_MAX_UPLOAD_MB,
    max_pixels: int | None = None,
    device: str = QUERY_DEVICE,
    nprobe: int | None = None,
) -> None:
    """Serve until interrupted. The index is opened here first, so a bad one fails at once."""
    try:
        import uvicorn
    except ImportError:
        raise InstretError(
            "instret serve needs Starlette and uvicorn (part of instret's install; missing here): pip install starlette uvicorn"
        ) from None
    from instret.web_app import create_app

    settings = dict(
        index_dir=str(index_dir),
        device=device,
        max_pixels=max_pixels,
        nprobe=nprobe,
        max_upload_bytes=int(max_upload_mb * 1e6),
    )
    live = _live(settings)
    port = _free_to_listen(host, port)
    if not _is_loopback(host):
        _say(
            f"warning: listening on {host}: anyone who can reach this machine can search the index and see its "
            f"images; --host 127.0.0.1 keeps it to this machine"
        )
    shown = f"[{host}]" if ":" in host else host
    _say(
        f"serving {live.dir} ({live.searcher.index.ntotal} images, {live.searcher.index.generation}) at "
        f"http://{shown}:{port}/  (Ctrl-C stops)"
    )
    options = dict(host=host, port=port, log_level="warning", access_log=False)
    try:
        if workers == 1:
            uvicorn.run(create_app(live, settings["max_upload_bytes"]), **options)
        else:
            os.environ[SETTINGS_VARIABLE] = json.dumps(settings)
            uvicorn.run("instret.serve:app_from_settings", factory=True, workers=workers, **options)
    except KeyboardInterrupt:  # uvicorn stops gracefully, then raises the signal again: Ctrl-C is how serve ends
        pass
    _say("stopped")


def app_from_settings():
    """The app of one worker process (uvicorn imports this by name in each)."""
    from instret.web_app import create_app

    settings = json.loads(os.environ[SETTINGS_VARIABLE])
    return create_app(_live(settings), settings["max_upload_bytes"])


def _live(s: dict):
    from instret.live_index import LiveSearcher

    return LiveSearcher(s["index_dir"], s["device"], s["max_pixels"], s["nprobe"], log=_say)


def _free_to_listen(host: str, port: int) -> int:
    """The port to listen on (a free one for 0); a clear error now, rather than uvicorn's
    logged one later, when the address is taken or not this machine's."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            raise InstretError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
        return probe.getsockname()[1]


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
