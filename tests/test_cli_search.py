import html
import json
import shutil

import pytest

import instret.env as instret_env
from instret.indexer import build_index
from tests.test_cli import run_cli, tiny_train_args


def index_with_type(photos, ix, factory) -> list[str]:
    """`instret index` of the photos into a new folder with the encoder of `ix`, as `factory`."""
    return ["index", str(photos), "--model", str(ix / "gen-000001" / "encoder.pt"), "--out", str(photos.parent / "n"),
            "--index-type", factory]  # fmt: skip


def test_query_text_output_is_rank_score_path(indexed, capsys):
    photos, ix = indexed
    code, out, err = run_cli(["query", str(photos / "a" / "001.jpg"), "--index", str(ix), "-k", "4"], capsys)
    assert code == 0, err
    lines = out.strip().split("\n")
    assert len(lines) == 4
    ranks = [line.split("\t") for line in lines]
    assert [r[0] for r in ranks] == ["1", "2", "3", "4"] and ranks[0][2].endswith("a/001.jpg")
    assert float(ranks[0][1]) == pytest.approx(1.0, abs=1e-4)


def test_query_json_schema_one_object_per_query(indexed, capsys):
    photos, ix = indexed
    queries = [str(photos / "a" / "001.jpg"), str(photos / "b" / "003.jpg")]
    code, out, err = run_cli(["query", *queries, "--index", str(ix), "-k", "3", "--json"], capsys)
    assert code == 0
    objects = [json.loads(line) for line in out.strip().split("\n")]
    assert [o["query"] for o in objects] == queries
    for o in objects:
        assert set(o) == {"query", "results"}
        assert [r["rank"] for r in o["results"]] == [1, 2, 3]
        for r in o["results"]:
            assert set(r) == {"rank", "id", "path", "score", "missing", "unrelated_above", "copies_below"}
            assert r["missing"] is False
            assert isinstance(r["score"], float) and 0 <= r["unrelated_above"] <= 1 and 0 <= r["copies_below"] <= 1
    assert "indexing" not in out  # logs stay on stderr


def test_html_page_holds_every_thumbnail_and_escapes_paths(indexed, tmp_path, capsys):
    photos, ix = indexed
    evil = photos / "a" / "<script>alert(1).jpg"
    shutil.copy(photos / "a" / "002.jpg", evil)
    build_index(photos, _run_of(ix), ix, workers=0, device="cpu")
    page = tmp_path / "out.html"
    code, out, err = run_cli(
        [
            "query",
            str(photos / "a" / "002.jpg"),
            str(photos / "b" / "001.jpg"),
            "--index",
            str(ix),
            *"-k 5 --html".split(),
            str(page),
        ],
        capsys,
    )
    assert code == 0, err
    text = page.read_text()
    assert text.count('src="data:image/jpeg;base64,') == 2 * (1 + 5)
    assert "<script>" not in text and html.escape("<script>") in text
    # Each thumbnail links to its image file.
    assert text.count('<a href="file:///') == 2 * (1 + 5) and (photos / "b" / "001.jpg").as_uri() in text


def _run_of(ix):
    # the encoder a test index was built with travels inside it
    from instret.index import SearchIndex

    return SearchIndex(ix).gen_dir / "encoder.pt"


def test_dups_json_and_info_and_env(indexed, capsys):
    photos, ix = indexed
    shutil.copy(photos / "c" / "004.jpg", photos / "c" / "copy.jpg")
    build_index(photos, _run_of(ix), ix, workers=0, device="cpu")
    code, out, _ = run_cli(["dups", str(ix), "--threshold", "0.99999", "--json"], capsys)
    groups = json.loads(out)["groups"]
    assert code == 0 and len(groups) == 1 and len(groups[0]["members"]) == 2 and groups[0]["tier"] == "exact"
    code, out, _ = run_cli(["info", str(ix), "--json"], capsys)
    info = json.loads(out)
    assert info["vectors"] == 31 and info["dim"] == 128 and info["index_type"] == "Flat" and info["bytes_total"] > 0
    code, out, _ = run_cli(["env", "--json"], capsys)
    env = json.loads(out)
    assert {"python", "torch", "torchvision", "faiss", "faiss_gpus", "torch_cuda", "side_by_side"} <= set(env)


def test_env_reads_each_packages_cuda_stack_from_what_it_requires(monkeypatch):
    requires = {
        "torch": ["filelock", 'cuda-toolkit[cublas,cudart]==13.0.3; platform_system == "Linux"'],
        "faiss-gpu": ["numpy>=1.25", "nvidia-cuda-runtime-cu12>=12.1", "nvidia-cublas-cu12"],
        "faiss-gpu-cuvs": ["numpy", "nvidia-cuda-runtime>=13.2", "cuvs"],
        "faiss-gpu-cu12": ["numpy", "nvidia-cublas-cu12>=12.1"],
        "faiss-cpu": ["numpy>=1.25", "packaging"],
    }
    monkeypatch.setattr(instret_env.metadata, "requires", requires.get)
    monkeypatch.setattr(instret_env, "_version", lambda package: "1" if package in requires else None)
    majors = {package: instret_env.cuda_major(package) for package in [*requires, "absent"]}
    assert majors == {
        "torch": "13",
        "faiss-gpu": "12",
        "faiss-gpu-cuvs": "13",
        "faiss-gpu-cu12": "12",
        "faiss-cpu": None,
        "absent": None,
    }
    assert instret_env.side_by_side("faiss-cpu", None, "13") == "yes: faiss-cpu uses no CUDA"
    assert instret_env.side_by_side("faiss-gpu-cuvs", "13", "13") == "yes: one CUDA 13 stack for both"
    assert instret_env.side_by_side("faiss-gpu", "12", "13").startswith(
        "two CUDA stacks in one process (FAISS on CUDA 12"
    )
    assert instret_env.side_by_side(None, None, "13") == "no FAISS installed"


def test_eval_retrieval_json(trained_run, capsys):
    photos = trained_run.parent / "photos"
    code, out, err = run_cli(
        ["eval-retrieval", str(photos), "--model", str(trained_run), "--json", "--workers", "0", "--device", "cpu"],
        capsys,
    )
    assert code == 0, err
    m = json.loads(out)
    assert set(m) == {"mAP", "recall@1", "recall@5", "recall@10", "precision@10", "queries"} and m["queries"] == 30
    assert 0 <= m["mAP"] <= 1 and m["recall@1"] <= m["recall@5"] <= m["recall@10"]


@pytest.mark.parametrize(
    "make_args,needle",
    [
        (lambda p, ix: ["query", str(p / "nope.jpg"), "--index", str(ix)], "nope.jpg"),
        (lambda p, ix: ["query", str(p / "bad.jpg"), "--index", str(ix)], "bad.jpg: cannot read image"),
        (lambda p, ix: ["query", str(p / "a" / "001.jpg"), "--index", str(ix), "-k", "0"], "Invalid value for '-k'"),
        (lambda p, ix: ["query", str(p / "a" / "001.jpg"), "--index", str(p)], "not an instret index"),
        (lambda p, ix: ["info", str(p / "missing")], "no such index folder"),
        (lambda p, ix: ["index", str(p), "--model", str(p / "a" / "001.jpg"), "--out", str(ix)], "encoder"),
        (lambda p, ix: ["query", str(p / "empty"), "--index", str(ix)], "empty: a folder with no image files in it"),
        # A bad --index-type is refused before any image is encoded (no "indexing ..." line), without guesses.
        (
            lambda p, ix: index_with_type(p, ix, "Bogus"),
            "--index-type 'Bogus' is not a FAISS factory string",
        ),
        (
            lambda p, ix: index_with_type(p, ix, "IVF9999,Flat"),
            "could not be trained on 31 vectors",
        ),
    ],
)
def test_bad_input_one_line_error(indexed, capsys, make_args, needle):
    photos, ix = indexed
    (photos / "bad.jpg").write_text("this is text, not a JPEG")
    (photos / "empty").mkdir()
    code, out, err = run_cli(make_args(photos, ix), capsys)
    assert code != 0 and err.count("\n") == 1 and needle in err, err
    assert "Traceback" not in err and "disk full" not in err


def test_k_larger_than_index_returns_everything(indexed, capsys):
    photos, ix = indexed
    code, out, _ = run_cli(["query", str(photos / "a" / "001.jpg"), "--index", str(ix), "-k", "1000"], capsys)
    assert code == 0 and len(out.strip().split("\n")) == 30


def test_train_with_data_leaves_a_queryable_index(image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_cli(tiny_train_args(image_folder, out), capsys)
    assert code == 0, err
    first = sorted(image_folder.rglob("*.png"))[0]  # an image the index holds: a query that runs as printed
    assert f"\n  instret query {first} --index {out} --html page.html   #" in err
    assert f"\n  instret serve --index {out}   #" in err
    code, stdout, err = run_cli(
        ["query", str(image_folder / "red" / "000.png"), "--index", str(out / "index"), "-k", "1"], capsys
    )
    assert code == 0 and stdout.split("\t")[2].strip().endswith("red/000.png")
    # The run folder stands for its index, for query and info alike.
    code, by_run, _ = run_cli(["query", str(image_folder / "red" / "000.png"), "--index", str(out), "-k", "1"], capsys)
    assert code == 0 and by_run == stdout
    code, info, _ = run_cli(["info", str(out), "--json"], capsys)
    assert code == 0 and json.loads(info)["index"] == str(out / "index")


def test_query_a_folder_queries_every_image_in_it(indexed, capsys):
    photos, ix = indexed
    code, out, err = run_cli(["query", str(photos / "a"), "--index", str(ix), "-k", "1", "--json"], capsys)
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [r["query"] for r in rows] == [str(p) for p in sorted((photos / "a").glob("*.jpg"))]
    for r in rows:  # each image finds itself first
        assert r["results"][0]["path"].endswith("/a/" + r["query"].rsplit("/", 1)[1])


def test_file_names_with_spaces_non_ascii_and_undecodable_bytes(trained_run, tmp_path, capsys):
    import os

    photos = shutil.copytree(trained_run.parent / "photos", tmp_path / "photos")
    odd = [b"with space.jpg", "caf\u00e9 \u65e5\u672c.jpg".encode(), b"bad\xff\xfename.jpg"]
    for name in odd:
        shutil.copy(photos / "a" / "001.jpg", os.path.join(os.fsencode(photos / "b"), name))
    summary = build_index(photos, trained_run, tmp_path / "ix", workers=0, device="cpu")
    assert summary["vectors"] == 33 and summary["skipped"] == 0
    again = build_index(photos, trained_run, tmp_path / "ix", workers=0, device="cpu")
    assert again["unchanged"] == 33 and again["encoded"] == 0
    query_path = os.fsdecode(os.path.join(os.fsencode(photos / "b"), odd[2]))
    code, out, err = run_cli(["query", query_path, "--index", str(tmp_path / "ix"), "-k", "5", "--json"], capsys)
    assert code == 0, err
    paths = {r["path"] for r in json.loads(out)["results"]}
    assert query_path in paths


def test_resuming_a_finished_run_keeps_its_index(image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--out", str(out), "--workers", "0"]
    code, _, err = run_cli(
        ["train", "--data", str(image_folder), *"--epochs 1 --image-size 16 --batch-size 8 --knn-k 5".split(), *args],
        capsys,
    )
    assert code == 0, err
    code, _, err = run_cli(["train", "--resume", *args], capsys)
    assert code == 0 and "0 to encode" in err and "no new generation" in err, err
    assert [p.name for p in (out / "index").glob("gen-*")] == ["gen-000001"]


def test_the_embedded_default_ends_with_a_search(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_cli(["train", "--epochs", "1", "--out", str(out), "--workers", "0"], capsys)
    assert code == 0, err
    assert len(list((out / "images").rglob("*.png"))) == 1797  # every digit, held-out ones too
    sample = err.split("sample query ")[1].split(" ")[0]
    assert f"next:\n  instret query {sample} --index {out} --html page.html   #" in err
    assert f"\n  instret serve --index {out}   #" in err and f"\n  instret plot {out}   #" in err
    code, stdout, _ = run_cli(["query", sample, "--index", str(out), "-k", "1", "--exclude-self"], capsys)
    assert code == 0 and len(stdout.strip().splitlines()) == 1


def test_index_batch_default_is_the_libraries():
    from instret.cli.search import index_cmd
    from instret.indexer import INDEX_BATCH, build_index

    assert {p.name: p.default for p in index_cmd.params}["batch_size"] == INDEX_BATCH
    assert build_index.__defaults__[1] == INDEX_BATCH


def test_index_out_a_run_folder_writes_its_own_index(trained_run, tmp_path, capsys):
    # What the README says: a run folder stands for its index wherever one is expected.
    run = shutil.copytree(trained_run, tmp_path / "run", ignore=shutil.ignore_patterns("index"))
    photos = trained_run.parent / "photos"
    code, out, err = run_cli(["index", str(photos), "--model", str(run), "--out", str(run)], capsys)
    assert code == 0, err
    assert json.loads(out)["index"] == str(run / "index") and (run / "index" / "CURRENT").is_file()
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == ["index"]  # nothing else written beside it
    code, out, err = run_cli(["query", str(photos / "a" / "000.jpg"), "--index", str(run), "-k", "1"], capsys)
    assert code == 0 and out.split("\t")[2].strip() == str(photos / "a" / "000.jpg")
    # An index folder names the encoder it was built with: the update re-encodes nothing.
    code, out, err = run_cli(["index", str(photos), "--model", str(run / "index"), "--out", str(run)], capsys)
    assert code == 0 and "no new generation" in err, err


@pytest.mark.parametrize(
    "given, what, instead",
    [
        ("encoder.pt", "an encoder file", "--index {run}"),
        ("checkpoint.pt", "a training checkpoint", "--index {run}"),
        ("index/{gen}/encoder.pt", "an encoder file", "--index {run}/index"),
    ],
)
def test_an_index_option_given_a_file_says_what_it_is_and_what_to_pass(trained_run, capsys, given, what, instead):
    from instret.locations import read_current

    gen = read_current(trained_run / "index")
    path = trained_run / given.format(gen=gen)
    code, _, err = run_cli(
        ["query", str(trained_run.parent / "photos" / "a" / "000.jpg"), "--index", str(path)], capsys
    )
    assert code == 1 and err.count("\n") == 1
    assert (
        err.strip()
        == f"instret: error: {path}: {what}, not an index; pass its folder: {instead.format(run=trained_run)}"
    )
