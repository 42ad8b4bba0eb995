"""The embedded default's first search: after `instret train` on the digits, their images as
files in RUN_DIR/images, an index of them in RUN_DIR/index, and one query shown, so that the
first command a newcomer runs ends where the tool is going: "show me more like this one"."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from instret.data import TrainData
from instret.invocation import command_line
from instret.progress import log
from instret.report import one_line

SAMPLE_QUERY = 5  # the held-out image shown as the sample query


def write_images(data: TrainData, root: Path) -> list[Path]:
    """Every image of the run as a PNG in a sub-folder per class (held-out ones too)."""
    written = []
    for split, images in (("train", data.train), ("test", data.eval)):
        if images is None:
            continue
        for i, (img, label) in enumerate(zip(images.images, images.labels.tolist())):
            path = root / images.classes[label] / f"{split}-{i:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.ascontiguousarray(img.permute(1, 2, 0).numpy())).save(path)
            written.append(path)
    return written


def first_search(data: TrainData, out: Path, workers: int, device: str) -> None:
    """Write the images, index them with the run's encoder, and show one query and what to run
    next; nothing when the run's index is of its current encoder already (a resumed finished run)."""
    from instret.indexer import build_index
    from instret.searcher import query

    if _index_is_current(out):
        return
    images = out / "images"
    written = write_images(data, images)
    build_index(images, out, out / "index", workers=workers, device=device, rebuild=True)
    sample = sorted(p for p in written if p.name.startswith("test-"))[SAMPLE_QUERY]
    hits = query(out / "index", [sample], k=6, exclude_self=True)[0]["results"]
    same = sum(Path(h["path"]).parent.name == sample.parent.name for h in hits)
    log(
        f"sample query {one_line(str(sample))} (a {sample.parent.name}): {same} of its {len(hits)} nearest "
        f"images are {sample.parent.name}s"
    )
    for h in hits:
        log(f"  {h['rank']}  {h['score']:.3f}  {one_line(h['path'])}")
    log(next_commands(out, sample, plot=True))


def next_commands(out: Path, sample: Path, plot: bool = False) -> str:
    """The `next:` lines that end a run: each a command that runs as printed, from where the run
    was started (the program named as it was started; a comment after `#` says what it shows)."""
    commands = [
        (command_line("query", sample, "--index", out, "--html", "page.html"), "the nearest images, as page.html"),
        (command_line("serve", "--index", out), "a search page in the browser (Ctrl-C stops)"),
    ]
    if plot:
        commands.append((command_line("plot", out), f"the training curves as {one_line(str(out / 'curves.png'))}"))
    return "next:\n" + "\n".join(f"  {line}   # {what}" for line, what in commands)


def _index_is_current(out: Path) -> bool:
    from instret.encoder import load_encoder
    from instret.index import SearchIndex
    from instret.locations import read_current

    if not (out / "index").is_dir() or read_current(out / "index") is None:
        return False
    index = SearchIndex(out / "index")
    index.close()
    return index.manifest["encoder_fingerprint"] == load_encoder(out).fingerprint
