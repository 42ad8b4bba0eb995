"""Pictures of a run and of its features, drawn with matplotlib (imported only here, and only
when a picture is asked for; part of the base install).

    training_curves(run_dir)        loss, the label-free monitor and kNN top-1 per epoch, from metrics.jsonl
    neighbour_grid(rows)            each query, then its neighbours with their scores
    query_grid(results)             the same for `instret query` results (`--grid`)
    feature_map(ax, xy, labels)     a 2-D embedding (t-SNE) coloured by class
    save_figure(fig, path)          PNG, written atomically
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np

from instret.errors import InstretError
from instret.storage import atomic_write_bytes


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed), or a one-line error."""
    try:
        import matplotlib
    except ImportError:
        raise InstretError(
            "plots need matplotlib (part of instret's install; missing here): pip install matplotlib"
        ) from None
    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")  # a notebook has set its own backend already; leave that one
    import matplotlib.pyplot as plt

    return plt


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        raise InstretError(f"{run_dir}: not a run folder (no metrics.jsonl)") from None
    except ValueError:
        raise InstretError(f"{path}: not valid JSON lines") from None
    if not rows:
        raise InstretError(f"{path}: no finished epoch yet")
    return rows


def training_curves(run_dir: str | Path):
    """A figure: the loss beside ln n (left), the label-free monitor (middle: instance recall@1,
    alignment, random-pair cosine) and the kNN top-1 when there are labels (right), by epoch."""
    rows = read_metrics(run_dir)
    plt = pyplot()
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(13, 3.4), layout="constrained")
    epochs = [r["epoch"] for r in rows]
    left.plot(epochs, [r["loss"] for r in rows], marker=".", label="loss")
    if "ln_n" in rows[-1]:
        left.axhline(rows[-1]["ln_n"], color="grey", linestyle="--", label="ln n (a guess)")
        left.legend(fontsize=8)
    left.set(xlabel="epoch", ylabel="training loss", title="loss")
    monitor = [r for r in rows if "instance_recall@1" in r]
    if monitor:
        x = [r["epoch"] for r in monitor]
        for key, label in (
            ("instance_recall@1", "instance recall@1"),
            ("alignment", "alignment (0 best)"),
            ("mean_pair_cosine", "random-pair cosine"),
        ):
            middle.plot(x, [r[key] for r in monitor], marker=".", label=label)
        middle.set(
            xlabel="epoch",
            title="label-free monitor",
            ylim=(min(0, *(r["mean_pair_cosine"] for r in monitor)), max(1, *(r["alignment"] for r in monitor))),
        )
        middle.legend(fontsize=8)
    else:
        _blank(middle, "no label-free monitor in this run")
    knn = [(r["epoch"], r["knn_top1"]) for r in rows if r.get("knn_top1") is not None]
    if knn:
        right.plot(*zip(*knn), marker=".", color="tab:green")
        right.set(xlabel="epoch", ylabel="kNN top-1", title="weighted kNN top-1 (monitor)", ylim=(0, 1))
    else:
        _blank(right, "no labels: no kNN accuracy")
    for ax in (left, middle, right):
        ax.xaxis.get_major_locator().set_params(integer=True)  # epochs are whole numbers
    fig.suptitle(Path(run_dir).name)
    return fig


def _blank(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center")
    ax.set_axis_off()


def _as_picture(image) -> np.ndarray:
    """H x W x 3 uint8 from a 3 x H x W uint8 tensor, an array, or a PIL image."""
    if hasattr(image, "permute"):  # torch tensor, channels first
        return image.detach().cpu().permute(1, 2, 0).numpy()
    return np.asarray(image)


def neighbour_grid(rows: list[dict], title: str | None = None):
    """One row per query: the query image, then its neighbours best first.

    rows: [{"query": image, "label": str (optional), "neighbours": [{"image", "score",
    "label" (optional), "match" (optional bool: drawn green when True, red when False),
    "missing" (optional bool: the file is gone; its tile is struck through)}, ...]}, ...]
    """
    plt = pyplot()
    cols = 1 + max((len(r["neighbours"]) for r in rows), default=0)
    fig, axes = plt.subplots(
        len(rows), cols, figsize=(1.15 * cols, 1.3 * len(rows)), squeeze=False, layout="constrained"
    )
    for row, r in zip(axes, rows):
        for ax in row:
            ax.set_axis_off()
        row[0].imshow(_as_picture(r["query"]))
        row[0].set_title(r.get("label", "query"), fontsize=7, fontweight="bold")
        for ax, n in zip(row[1:], r["neighbours"]):
            ax.imshow(_as_picture(n["image"]))
            colour = {True: "tab:green", False: "tab:red"}.get(n.get("match"), "black")
            if n.get("missing"):
                _strike(ax)
                colour = "tab:red"
            caption = f"{n['score']:.3f}" + (" missing" if n.get("missing") else "")
            caption += f"\n{n['label']}" if n.get("label") else ""
            ax.set_title(caption, fontsize=6 if n.get("label") else 7, color=colour)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def _strike(ax) -> None:
    """A red cross over the tile: the file it stands for is gone."""
    for ends in (((0, 1), (0, 1)), ((0, 1), (1, 0))):
        ax.plot(*ends, transform=ax.transAxes, color="tab:red", linewidth=1.5)


def query_grid(results: list[dict], size: int = 96):
    """neighbour_grid of `instret query` results (image files read again, as thumbnails; a file
    gone since it was indexed is a grey tile, struck through)."""
    from instret.images import thumbnail

    def picture(path):
        img = thumbnail(path, size)
        if img is None:  # a grey square keeps the layout
            return np.full((size, size, 3), 128, dtype=np.uint8)
        return np.asarray(img)

    rows = [
        {
            "query": picture(r["query"]),
            "label": _short(r["query"]),
            "neighbours": [
                {
                    "image": picture(h["path"]),
                    "score": h["score"],
                    "label": _short(h["path"]),
                    "missing": h.get("missing", False),
                }
                for h in r["results"]
            ],
        }
        for r in results
    ]
    return neighbour_grid(rows)


def _short(path: str, width: int = 16) -> str:
    """folder/name (the folder often says what the image is), cut to width: what fits a tile's
    column in the grid's title fonts."""
    name = "/".join(Path(path).parts[-2:])
    return name if len(name) <= width else "..." + name[3 - width :]


def feature_map(ax, xy: np.ndarray, labels: np.ndarray, classes: list[str], title: str) -> None:
    """A 2-D embedding on ax, one colour per class."""
    cmap = pyplot().colormaps["tab10"]
    for c, name in enumerate(classes):
        pts = xy[labels == c]
        ax.scatter(pts[:, 0], pts[:, 1], s=4, color=cmap(c % 10), label=name)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Write fig as PNG atomically (a reader never sees half a picture) and close it."""
    path = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    pyplot().close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path
