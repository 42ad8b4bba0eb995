"""Streamed training data: the same pixels, hence the same run, as the resident set, with
only file paths held in memory."""

import json
import os

import pytest
import torch

from instret.data import load_folder
from instret.images import read_image
from instret.imagesource import GREY, ResidentImages, StreamedImages, chunks, evenly_spaced
from instret.run import train
from instret.trainer import load_checkpoint
from tests.conftest import make_image_folder

TINY = dict(image_size=16, batch_size=8, knn_k=5, nce_k=16, arch="small", epochs=2)


@pytest.fixture
def split_folder(tmp_path):
    make_image_folder(tmp_path / "d" / "train", per_class=9, seed=1)
    make_image_folder(tmp_path / "d" / "test", per_class=4, seed=2)
    return tmp_path / "d"


def test_evenly_spaced_ids():
    assert evenly_spaced(5, 10).tolist() == [0, 1, 2, 3, 4]
    assert evenly_spaced(10, 3).tolist() == [0, 3, 6]
    assert [len(c) for c in chunks(torch.arange(11), 4)] == [4, 4, 3]


@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_batches_are_the_files_decoded_one_by_one_in_the_order_asked(image_folder, workers):
    data = load_folder(image_folder, 16, stream=True)
    assert data.train.images is None and len(data.train) == 36
    resident = ResidentImages(load_folder(image_folder, 16).train.images, torch.device("cpu"))
    streamed = StreamedImages(data.train.paths, 16, torch.device("cpu"), workers=workers)
    g = torch.Generator().manual_seed(0)
    id_lists = [torch.randperm(36, generator=g)[:n] for n in (5, 1, 12, 7)]
    for ids, got, kept in zip(id_lists, streamed.batches(id_lists), resident.batches(id_lists)):
        slow = torch.stack([read_image(data.train.paths[i], 16) for i in ids.tolist()])
        assert got.dtype == torch.uint8 and torch.equal(got, slow) and torch.equal(kept, slow)


@pytest.mark.parametrize("loss", ["softmax", "nce"])
def test_a_streamed_run_equals_the_resident_run_bit_for_bit(split_folder, tmp_path, loss):
    runs = {}
    for stream, workers in ((False, 0), (True, 0), (True, 2)):
        out = tmp_path / f"run-{stream}-{workers}"
        final = train(
            {"data": str(split_folder), "out": str(out), "stream": stream, "workers": workers, "loss": loss, **TINY}
        )
        runs[stream, workers] = (final, load_checkpoint(out / "checkpoint.pt"))
    (final, ckpt) = runs[False, 0]
    for key in ((True, 0), (True, 2)):
        other_final, other = runs[key]
        assert {**other_final, "train_seconds": 0} == {
            **final,
            "train_seconds": 0,
        }  # kNN top-1/top-5 of the final encoder
        assert torch.equal(other["bank"]["features"], ckpt["bank"]["features"])
        assert all(torch.equal(other["model"][k], ckpt["model"][k]) for k in ckpt["model"])


def test_resume_may_switch_between_resident_and_streamed(split_folder, tmp_path):
    whole = tmp_path / "whole"
    train({"data": str(split_folder), "out": str(whole), "stream": False, "workers": 0, **TINY})
    half = tmp_path / "half"
    train({"data": str(split_folder), "out": str(half), "stream": False, "workers": 0, **{**TINY, "epochs": 1}})
    train({"out": str(half), "stream": True, "epochs": 2}, resume=True)
    a, b = (load_checkpoint(p / "checkpoint.pt") for p in (whole, half))
    assert torch.equal(a["bank"]["features"], b["bank"]["features"])
    assert json.loads((half / "config.json").read_text())["stream"] is True


def test_a_file_unreadable_after_the_check_trains_as_grey_and_is_reported(image_folder, tmp_path, capsys):
    data = load_folder(image_folder, 16, stream=True)
    streamed = StreamedImages(data.train.paths, 16, torch.device("cpu"), workers=0)
    gone = data.train.paths[4]
    open(gone, "wb").close()  # truncated to nothing after the start of training
    (batch,) = streamed.batches([torch.tensor([3, 4, 5])])
    assert torch.equal(batch[1], torch.full((3, 16, 16), GREY, dtype=torch.uint8))
    assert torch.equal(batch[0], read_image(data.train.paths[3], 16))
    err = capsys.readouterr().err
    assert gone in err and "empty file" in err and "grey image stands in" in err


def test_auto_streams_only_a_set_too_large_to_hold(image_folder, monkeypatch):
    import instret.data as data_module

    assert load_folder(image_folder, 16, stream=None).train.images is not None  # 36 tiny images
    monkeypatch.setattr(data_module, "too_large_to_hold", lambda n, size: True)
    streamed = load_folder(image_folder, 16, stream=None).train
    assert streamed.images is None and len(streamed.paths) == 36 and len(streamed.labels) == 36


def test_too_large_to_hold_compares_the_decoded_bytes_with_a_share_of_the_memory():
    from instret.data import too_large_to_hold

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    n = memory // (4 * 3 * 32 * 32)  # a quarter of the memory, in 32 x 32 images
    assert not too_large_to_hold(n, 32) and too_large_to_hold(n + 1, 32)
