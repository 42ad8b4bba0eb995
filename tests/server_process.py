"""A real `instret serve` process on a free loopback port, and a small HTTP client for it."""

from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path


class Server:
    def __init__(self, index_dir: Path, *options: str, timeout: float = 90, program=("-m", "instret"), env=None):
        """program: what python runs (a wrapper script such as tests/slow_instret.py); env: extra
        environment variables."""
        self.process = subprocess.Popen(
            [sys.executable, *program, "serve", "--index", str(index_dir), "--port", "0", *options],
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.log = []
        deadline = time.monotonic() + timeout
        while True:  # the first line names the address
            line = self.process.stderr.readline()
            if not line:
                raise RuntimeError(f"serve exited with {self.process.wait()}: {''.join(self.log)}")
            self.log.append(line)
            found = re.search(r"at http://127\.0\.0\.1:(\d+)/", line)
            if found:
                self.port = int(found.group(1))
                break
        while self.get("/api/v1/health", check=False)[0] != 200:
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"serve did not come up: {''.join(self.log)}")
            time.sleep(0.2)

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        """(status, headers, body bytes)."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        except ConnectionRefusedError:
            return 0, {}, b""
        finally:
            connection.close()

    def get(self, path: str, check: bool = True):
        """(status, parsed JSON, or the raw bytes when not JSON)."""
        status, headers, body = self.request("GET", path)
        return _result(status, headers, body, check)

    def post(self, path: str, body: bytes, content_type: str = "application/octet-stream", check: bool = True):
        status, headers, data = self.request("POST", path, body, {"Content-Type": content_type})
        return _result(status, headers, data, check)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _result(status, headers, body, check):
    is_json = headers.get("content-type", "").startswith("application/json")
    value = json.loads(body) if is_json else body
    if check and status != 200:
        raise AssertionError(f"HTTP {status}: {value!r}"[:500])
    return status, value


def multipart(files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    """(body, content type) of a multipart/form-data upload of these (name, bytes) files."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, data in files:
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n"
        )
        parts.append(head.encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"
