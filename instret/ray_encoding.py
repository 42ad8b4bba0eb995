"""`instret index --ray`: the files to encode go through a Ray Data pipeline.

    paths in blocks -> decode (tasks) -> encode (a pool of encoder actors) -> back to the driver

Only the encoding moves: the listing, the decision of what to encode (new, changed, unchanged,
deleted), the staging, the FAISS build and the atomic generation stay on the driver
(instret.indexer), so a Ray build equals a one-machine build. Batches stream back as they
finish and each is committed to staging at once: a driver killed midway resumes without
encoding them again. Ray retries a task or actor it loses. The encoder's bytes travel through
Ray's object store; the image files are read where the tasks run, so every node must see the
folder at the same path (shared storage).
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

from instret.env import usable_cpus
from instret.errors import InstretError
from instret.progress import Progress

LOCAL = "local"  # --ray without an address: a Ray started on this machine for the build
CONNECT_SECONDS = 5.0  # an address that does not answer within this is refused
JOIN_SECONDS = 15.0  # nor one where no Ray cluster takes us in within this (a join takes 1-3 s)
FILES_PER_BLOCK = 256  # paths per block of the read (64: 0.69 of the plain build's rate, 256: 0.99)


def encode_files_on_ray(encoder, encoder_path: Path, root: Path, files, staging, batch_size: int, max_pixels, address):
    """As instret.indexer.encode_files, on Ray: ({rel: (sha, vector)}, skipped). The address
    has passed check_address."""
    ray = _connect(address)
    try:
        return _encode(ray, encoder, encoder_path, root, files, staging, batch_size, max_pixels)
    finally:
        ray.shutdown()


def _connect(address: str):
    # Ray's own progress lines and notices would bury instret's; its errors still raise here.
    # (Its core warns that Ray Data's actors take arguments from the object store: it does.)
    # Read when Ray is imported.
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    try:
        import ray
    except ImportError:
        raise InstretError("--ray needs Ray: pip install 'instret[ray]'") from None
    logging.getLogger("ray").setLevel(logging.ERROR)
    quiet = {"log_to_driver": False, "configure_logging": False, "logging_level": logging.ERROR}
    if address == LOCAL:
        ray.init(address="local", num_cpus=usable_cpus(), include_dashboard=False, **quiet)  # a new one, always
    else:  # build_index has checked the address already
        try:
            ray.init(address=address, **quiet)
        except Exception as e:  # Ray raises several kinds (ConnectionError, RuntimeError, ...)
            raise InstretError(f"--ray {address}: cannot join the Ray cluster ({str(e).splitlines()[0]})") from None
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    return ray


def check_address(address: str) -> None:
    """Refuse, within seconds, an address where no Ray cluster takes us in: nothing answers
    (CONNECT_SECONDS), something that is not a Ray head does, or the head wants a token (Ray
    itself would retry for a minute or more, printing as it goes)."""
    if address in (LOCAL, "auto"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise InstretError(f"--ray {address}: expected HOST:PORT (the head node's GCS, 6379) or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_SECONDS).close()
    except OSError as e:
        raise InstretError(f"--ray {address}: no Ray head answers there ({e.strerror or e})") from None
    _probe_join(address)


def _probe_join(address: str) -> None:
    """Join the cluster from a child process and leave again; its stderr is read as it comes, so
    that Ray's retries (a line a second for a minute) end at the first that says why."""
    probe = f"import ray; ray.init(address={address!r}, log_to_driver=False); ray.shutdown()"
    child = subprocess.Popen(
        [sys.executable, "-c", probe], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, errors="replace"
    )
    timer = threading.Timer(JOIN_SECONDS, child.kill)
    timer.start()
    retries = []
    try:
        for line in child.stderr:
            if "InvalidAuthToken" in line:
                raise InstretError(
                    f"--ray {address}: the cluster wants its token: set RAY_AUTH_MODE=token here, with the "
                    "cluster's token in RAY_AUTH_TOKEN or ~/.ray/auth_token"
                )
            if "Failed to get cluster ID" in line:
                retries.append(line.split("Failed to get cluster ID from GCS server:")[-1].strip())
                if len(retries) == 3:
                    raise InstretError(f"--ray {address}: not a Ray head ({retries[-1]})")
        if child.wait() != 0:
            raise InstretError(f"--ray {address}: cannot join the Ray cluster (no Ray cluster took us in)")
    finally:
        timer.cancel()
        child.kill()
        child.wait()


def _encode(ray, encoder, encoder_path: Path, root: Path, files, staging, batch_size: int, max_pixels):
    from instret.indexer import stage_batch

    done, skipped = {}, []
    if not files:
        return done, skipped
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    # One encoder per GPU, fed by decoding tasks on the CPUs; without GPUs one actor per core,
    # each decoding its own batches (Ray fuses the two stages where their resources agree).
    actors = gpus or max(1, int(resources.get("CPU", 1)))
    items = [{"position": i, "path": str(root / f.rel)} for i, f in enumerate(files)]
    # Results come back a block at a time: at least a few blocks per actor, however few the files.
    blocks = max(-(-len(items) // FILES_PER_BLOCK), min(len(items) // batch_size, 4 * actors), 1)
    dataset = (
        ray.data.from_items(items, override_num_blocks=blocks)
        .map_batches(decode, fn_args=(encoder.image_size, max_pixels), batch_size=batch_size)
        .map_batches(
            encoder_class(ray.put(Path(encoder_path).read_bytes()), encoder.fingerprint),
            batch_size=batch_size,
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_gpus=1 if gpus else 0,
            num_cpus=0 if gpus else 1,
        )
    )
    progress = Progress(len(files), "encoding on ray")
    for batch in dataset.iter_batches(batch_size=batch_size, batch_format="numpy"):  # a staging commit each
        rows = []
        for position, digest, vector, error in zip(batch["position"], batch["sha256"], batch["vector"], batch["error"]):
            f = files[int(position)]
            if error:
                skipped.append((f.rel, str(error)))
            else:
                rows.append((f, str(digest), np.asarray(vector, dtype=np.float32)))
        if rows:
            stage_batch(staging, done, rows)
        progress.update(len(batch["position"]), "")
    progress.close()
    skipped.sort(key=lambda item: item[0])
    return done, skipped


def decode(batch: dict, image_size: int, max_pixels) -> dict:
    """A Ray Data task: a batch of paths -> the encoder's uint8 inputs, their sha256, or why not."""
    from instret.images import DecodeDataset

    files = DecodeDataset([str(path) for path in batch["path"]], image_size, max_pixels, hashes=True)
    images = np.zeros((len(files), 3, image_size, image_size), dtype=np.uint8)
    digests, errors = [], []
    for k in range(len(files)):  # as the plain build decodes each file
        _, picture, digest, reason = files[k]
        if picture is not None:
            images[k] = picture.numpy()
        digests.append(digest or "")
        errors.append("" if picture is not None else reason or "unreadable")
    return {"position": batch["position"], "image": images, "sha256": np.array(digests), "error": np.array(errors)}


class Encode:
    """A Ray Data actor: holds one encoder (on a GPU when the actor has one) and embeds batches.
    What it loads is set on a subclass (encoder_class), not passed to it: Ray warns about actor
    arguments that live in its object store."""

    blob = None  # a reference to the encoder file's bytes in Ray's object store
    fingerprint = ""

    def __init__(self):
        import ray
        import torch

        from instret.encoder import load_encoder

        device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu":
            torch.set_num_threads(1)  # one core per actor: the pool is sized to the cores
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "encoder.pt")
            with open(path, "wb") as f:
                f.write(ray.get(self.blob))
            self.encoder = load_encoder(path, device)
        if self.encoder.fingerprint != self.fingerprint:
            raise RuntimeError(f"encoder {self.encoder.fingerprint} received, {self.fingerprint} expected")
        self.torch = torch

    def __call__(self, batch: dict) -> dict:
        from instret.faiss_boundary import as_float32

        good = np.flatnonzero(batch["error"] == "")
        vectors = np.zeros((len(batch["error"]), self.encoder.dim), dtype=np.float32)
        if len(good):
            images = self.torch.from_numpy(np.ascontiguousarray(batch["image"][good]))
            vectors[good] = as_float32(self.encoder.embed_inputs(images))
        return {"position": batch["position"], "sha256": batch["sha256"], "vector": vectors, "error": batch["error"]}


def encoder_class(blob, fingerprint: str) -> type:
    return type("Encode", (Encode,), {"blob": blob, "fingerprint": fingerprint})
