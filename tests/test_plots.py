import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from instret import explore, plots
from instret.augment import Augment
from instret.encoder import Encoder, LoadedEncoder
from instret.errors import InstretError
from instret.indexer import build_index
from tests.test_cli import run_cli


def test_library_and_commands_import_no_matplotlib():
    code = (
        "import sys, instret.cli.main, instret.run, instret.searcher, instret.indexer, instret.explore; "
        "sys.exit('matplotlib' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_plot_command_writes_the_curves_png(trained_run, tmp_path, capsys):
    code, _, err = run_cli(["plot", str(trained_run), "--out", str(tmp_path / "c.png")], capsys)
    assert code == 0, err
    with Image.open(tmp_path / "c.png") as img:
        assert img.format == "PNG" and img.width > img.height > 200
    code, _, err = run_cli(["plot", str(tmp_path)], capsys)
    assert code == 1 and err.count("\n") == 1 and "no metrics.jsonl" in err


def test_curves_have_one_point_per_epoch(trained_run):
    fig = plots.training_curves(trained_run)
    loss_ax, monitor_ax, knn_ax = fig.axes
    rows = plots.read_metrics(trained_run)
    assert len(loss_ax.lines[0].get_xdata()) == len(knn_ax.lines[0].get_xdata()) == len(rows) == 30
    # The loss is drawn beside ln n, and the monitor's three curves hold the rows' values.
    assert list(loss_ax.lines[1].get_ydata()) == [rows[-1]["ln_n"]] * 2
    recall, alignment, cosine = monitor_ax.lines
    assert list(recall.get_ydata()) == [r["instance_recall@1"] for r in rows]
    assert list(cosine.get_ydata()) == [r["mean_pair_cosine"] for r in rows]
    fig.canvas.draw()  # tick labels exist once drawn
    ticks = [t.get_text() for t in loss_ax.get_xticklabels()]
    assert ticks and all(t.lstrip("−-").isdigit() for t in ticks)  # whole epochs, never 1.2, 1.4
    plots.pyplot().close(fig)


def test_query_grid_png_has_a_row_per_query_and_k_plus_one_columns(trained_run, tmp_path, capsys):
    photos = trained_run.parent / "photos"
    build_index(photos, trained_run, tmp_path / "ix", workers=0, device="cpu")
    queries = [str(photos / "a" / "001.jpg"), str(photos / "b" / "002.jpg")]
    code, out, err = run_cli(
        ["query", *queries, "--index", str(tmp_path / "ix"), "-k", "4", "--grid", str(tmp_path / "g.png")], capsys
    )
    assert code == 0, err
    from instret.searcher import query

    fig = plots.query_grid(query(tmp_path / "ix", queries, k=4))
    assert len(fig.axes) == 2 * 5
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0] == "a/001.jpg" and titles[1] == "1.000\na/001.jpg"  # the query finds itself first, named
    plots.pyplot().close(fig)
    with Image.open(tmp_path / "g.png") as img:
        assert img.format == "PNG" and img.width > img.height


def test_without_matplotlib_a_plot_is_one_clear_error(monkeypatch, trained_run):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(InstretError, match=r"plots need matplotlib .*: pip install matplotlib$"):
        plots.training_curves(trained_run)


def _images(n=12, size=16, seed=0):
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_augmented_copies_without_augmentation_are_identical():
    torch.manual_seed(0)
    enc = LoadedEncoder(Encoder("small", 16, 16).eval(), (0.5,) * 3, (0.25,) * 3, "x")
    identity = Augment(
        16, enc.mean, enc.std, scale=(1.0, 1.0), ratio=(1.0, 1.0), jitter=0.0, grayscale_p=0.0, flip=False
    )
    same, different = explore.augmented_pair_similarities(enc, _images(), identity)
    assert np.allclose(same, 1.0, atol=1e-5)
    f = explore.features(enc, _images())
    assert np.allclose(different, (f * f.roll(1, dims=0)).sum(dim=1).numpy(), atol=1e-5)


def test_neighbours_and_knn_predict_equal_brute_force():
    g = torch.Generator().manual_seed(1)
    keys = torch.nn.functional.normalize(torch.randn(50, 8, generator=g), dim=1)
    labels = torch.randint(0, 3, (50,), generator=g)
    sims, ids = explore.neighbours(keys, keys, k=5, exclude_self=True)
    full = keys @ keys.T
    full.fill_diagonal_(-2)
    assert torch.equal(ids, full.topk(5, dim=1).indices)
    pred = explore.knn_predict(sims, ids, labels, 3, sigma=0.1)
    for q in range(50):
        votes = [sum(float(torch.exp(s / 0.1)) for s, i in zip(sims[q], ids[q]) if labels[i] == c) for c in range(3)]
        assert int(pred[q]) == int(np.argmax(votes))


def test_pixels_are_centred_unit_rows():
    f = explore.pixels(_images())
    assert torch.allclose(f.norm(dim=1), torch.ones(12), atol=1e-5) and f.shape == (12, 3 * 16 * 16)


def test_grid_texts_are_the_query_name_and_each_neighbours_score_and_name(trained_run, tmp_path):
    photos = trained_run.parent / "photos"
    results = [
        {
            "query": str(photos / "a" / "001.jpg"),
            "results": [
                {"rank": 1, "score": 0.9876, "path": str(photos / "b" / "002.jpg")},
                {"rank": 2, "score": 0.5, "path": str(photos / "c" / "003.jpg")},
            ],
        }
    ]
    fig = plots.query_grid(results)
    fig.canvas.draw()
    assert fig._suptitle is None  # no heading: it once repeated the last neighbour's caption
    assert [ax.get_title() for ax in fig.axes] == ["a/001.jpg", "0.988\nb/002.jpg", "0.500\nc/003.jpg"]
    # Every text lies inside the figure: the query's long name is cut to fit, not at the edge.
    long = tmp_path / "a-folder-with-a-long-name" / "a-photo-with-a-long-name.jpg"
    fig = plots.query_grid([{"query": str(long), "results": results[0]["results"]}])
    fig.canvas.draw()
    box = fig.bbox
    for ax in fig.axes:
        extent = ax.title.get_window_extent()
        assert box.x0 <= extent.x0 and extent.x1 <= box.x1, (ax.get_title(), extent, box)
    assert fig.axes[0].get_title() == "...long-name.jpg"
    plots.pyplot().close(fig)


def test_a_title_given_heads_the_grid_once(trained_run):
    blank = np.zeros((8, 8, 3), np.uint8)
    rows = [{"query": blank, "neighbours": [{"image": blank, "score": 0.25}]}]
    fig = plots.neighbour_grid(rows, "what the encoder finds")
    assert fig._suptitle.get_text() == "what the encoder finds"
    assert [ax.get_title() for ax in fig.axes] == ["query", "0.250"]
    plots.pyplot().close(fig)
