"""`instret serve` against a real server process on a loopback port: every endpoint, the same
JSON as the command line, bad requests refused while the server keeps serving, concurrency,
and a generation switch under load."""

import io
import json
import shutil
import threading
import types
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from instret.indexer import build_index
from tests.server_process import Server, multipart
from tests.test_cli import run_cli

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")


@pytest.fixture(scope="module")
def served(trained_run, tmp_path_factory):
    """(photos, index folder, server) over a copy of the trained run's photos."""
    base = tmp_path_factory.mktemp("served")
    photos = shutil.copytree(trained_run.parent / "photos", base / "photos")
    build_index(photos, trained_run, base / "ix", workers=0, device="cpu")
    server = Server(base / "ix")
    yield photos, base / "ix", server
    server.stop()


def cli_json(args, capsys) -> list[dict]:
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    return [json.loads(line) for line in out.strip().split("\n")]


def test_health_and_info_match_the_command_line(served, capsys):
    photos, ix, server = served
    _, health = server.get("/api/v1/health")
    assert health == {"status": "ok", "generation": "gen-000001", "vectors": 30}
    _, info = server.get("/api/v1/info")
    assert info == cli_json(["info", str(ix), "--json"], capsys)[0]


def test_upload_gives_what_query_json_prints_for_the_same_image(served, capsys):
    photos, ix, server = served
    image = photos / "b" / "003.jpg"
    expected = cli_json(["query", str(image), "--index", str(ix), "-k", "5", "--json"], capsys)[0]
    _, raw = server.post("/api/v1/search?k=5&name=mine.jpg", image.read_bytes())
    assert raw["generation"] == "gen-000001" and len(raw["queries"]) == 1
    assert raw["queries"][0] == {**expected, "query": "mine.jpg"}
    assert raw["queries"][0]["results"][0]["path"] == str(image)  # the image finds itself first
    body, content_type = multipart([("one.jpg", image.read_bytes())])
    _, form = server.post("/api/v1/search?k=5", body, content_type)
    assert form["queries"] == [{**expected, "query": "one.jpg"}]


def test_several_uploads_at_once_each_answered_in_order(served, capsys):
    photos, ix, server = served
    images = [photos / "a" / "001.jpg", photos / "c" / "007.jpg", photos / "b" / "000.jpg"]
    expected = cli_json(["query", *map(str, images), "--index", str(ix), "-k", "3", "--json"], capsys)
    body, content_type = multipart([(p.name, p.read_bytes()) for p in images])
    _, found = server.post("/api/v1/search?k=3", body, content_type)
    assert [q["query"] for q in found["queries"]] == [p.name for p in images]
    for got, want in zip(found["queries"], expected):
        assert [h["path"] for h in got["results"]] == [h["path"] for h in want["results"]]
        assert [h["score"] for h in got["results"]] == pytest.approx([h["score"] for h in want["results"]], abs=1e-5)


def test_search_by_indexed_id_or_path_uses_the_stored_vector(served, capsys):
    photos, ix, server = served
    image = photos / "c" / "002.jpg"
    expected = cli_json(["query", str(image), "--index", str(ix), "-k", "4", "--json"], capsys)[0]
    first = expected["results"][0]
    _, by_path = server.get(f"/api/v1/search?path={image}&k=4")
    _, by_id = server.get(f"/api/v1/search?id={first['id']}&k=4")
    _, relative = server.get("/api/v1/search?path=c/002.jpg&k=4")
    assert by_path == by_id == relative
    got = by_id["queries"][0]
    assert got["query"] == str(image)
    assert [h["path"] for h in got["results"]] == [h["path"] for h in expected["results"]]
    assert [h["score"] for h in got["results"]] == pytest.approx([h["score"] for h in expected["results"]], abs=1e-5)
    _, without = server.get(f"/api/v1/search?id={first['id']}&k=3&exclude_self=1")
    assert [h["path"] for h in without["queries"][0]["results"]] == [h["path"] for h in expected["results"][1:]]
    _, two = server.get(f"/api/v1/search?id={first['id']}&id=0&k=2")
    assert len(two["queries"]) == 2 and two["queries"][1]["results"][0]["id"] == 0


def test_min_score_and_k_filter_results(served):
    photos, ix, server = served
    data = (photos / "a" / "004.jpg").read_bytes()
    _, found = server.post("/api/v1/search?k=30", data)
    scores = [h["score"] for h in found["queries"][0]["results"]]
    assert len(scores) == 30 and scores == sorted(scores, reverse=True)
    # Between the 7th and 8th scores: the scores shown are rounded to 6 decimals, so a cut at a
    # shown score may fall just above the score it shows.
    assert scores[6] - scores[7] > 1e-5
    cut = (scores[6] + scores[7]) / 2
    _, kept = server.post(f"/api/v1/search?k=30&min_score={cut}", data)
    assert [h["score"] for h in kept["queries"][0]["results"]] == scores[:7]


def test_duplicates_are_what_dups_json_prints(served, capsys):
    photos, ix, server = served
    expected = cli_json(["dups", str(ix), "--json"], capsys)[0]
    _, found = server.get("/api/v1/duplicates")
    assert found == {"generation": "gen-000001", **expected}
    expected = cli_json(["dups", str(ix), "--threshold", "0.9", "--keep", "path", "--json"], capsys)[0]
    _, found = server.get("/api/v1/duplicates?threshold=0.9&keep=path")
    assert found == {"generation": "gen-000001", **expected} and found["groups"]
    assert server.get("/api/v1/duplicates/progress")[1] == {"running": False}  # nothing being found now


def test_the_duplicates_progress_says_where_a_computation_stands(monkeypatch):
    """While one request finds the groups, another reads its stage; once done, nothing runs."""
    from instret import web_app

    told, release = threading.Event(), threading.Event()

    def slow_find(index, *settings, progress):
        progress("search", 0, 0)
        progress("verify", 64, 200)
        told.set()
        release.wait(30)
        return {"groups": []}

    monkeypatch.setattr(web_app, "find_duplicates", slow_find)
    monkeypatch.setattr(web_app, "SearchIndex", lambda *args, **kwargs: types.SimpleNamespace(close=lambda: None))
    cache = web_app._DuplicatesCache()
    assert cache.progress() == {"running": False}
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(cache.get, "ix", "gen-000001", None, 0.99, "largest", False)
        assert told.wait(30)
        now = cache.progress()
        release.set()
        assert answer.result(30) == {"groups": []}
    assert now.pop("seconds") >= 0 and now == {"running": True, "stage": "verify", "done": 64, "total": 200}
    assert cache.progress() == {"running": False}


def test_image_and_thumbnail_serve_indexed_files_only(served):
    photos, ix, server = served
    image = photos / "a" / "005.jpg"
    _, found = server.get(f"/api/v1/search?path={image}&k=1")
    id_ = found["queries"][0]["results"][0]["id"]
    status, headers, body = server.request("GET", f"/api/v1/image/{id_}")
    assert status == 200 and body == image.read_bytes() and headers["content-type"] == "image/jpeg"
    assert headers["x-content-type-options"] == "nosniff"
    status, headers, body = server.request("GET", f"/api/v1/thumbnail/{id_}?size=32")
    picture = Image.open(io.BytesIO(body))
    assert status == 200 and picture.format == "JPEG" and max(picture.size) == 32
    for bad, want in [
        ("/api/v1/image/999", 404),
        ("/api/v1/thumbnail/999", 404),
        ("/api/v1/thumbnail/1?size=9000", 400),
    ]:
        status, value = server.get(bad, check=False)
        assert status == want and set(value) == {"error"}


def test_path_traversal_and_listing_are_refused(served):
    photos, ix, server = served
    secret = (ix / "CURRENT").read_bytes()
    for path in [
        "/static/../../../../etc/passwd",
        "/static/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/static/..%2f..%2f..%2fetc%2fpasswd",
        "/static/",
        "/static",
        "/api/v1/image/..%2f..%2fetc%2fpasswd",
        "/api/v1/image/-1",
        f"/api/v1/search?path={ix}/CURRENT",
        "/api/v1/search?path=../../../etc/passwd",
        f"/{ix}/CURRENT",
    ]:
        status, headers, body = server.request("GET", path)
        assert status in (307, 400, 404, 405), (path, status)  # 307: /static to /static/, a 404
        assert b"root:" not in body and secret not in body, path
    status, _, body = server.request("GET", "/static/app.js")
    assert status == 200 and b"textContent" in body


def bomb_png() -> bytes:
    """A 20,000 x 20,000 PNG (400 M pixels) of a few hundred KB."""
    buf = io.BytesIO()
    Image.new("1", (20_000, 20_000)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "name, body, status, says",
    [
        ("empty", b"", 400, "empty file"),
        ("truncated", None, 400, "cannot read image"),
        ("html", b"<!DOCTYPE html><html><body>hello</body></html>", 400, "not an image"),
        ("bomb", "bomb", 400, "pixels"),
    ],
)
def test_bad_upload_is_a_one_line_4xx_and_the_server_serves_on(served, name, body, status, says):
    photos, ix, server = served
    if body is None:
        body = (photos / "a" / "001.jpg").read_bytes()[:300]
    elif body == "bomb":
        body = bomb_png()
    got, value = server.post(f"/api/v1/search?name={name}", body, check=False)
    assert got == status and set(value) == {"error"} and says in value["error"] and "\n" not in value["error"]
    assert name in value["error"]
    assert server.get("/api/v1/health")[1]["status"] == "ok"


def test_upload_over_the_limit_is_refused_before_it_is_read(served):
    photos, ix, server = served
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.putrequest("POST", "/api/v1/search")
    connection.putheader("Content-Type", "application/octet-stream")
    connection.putheader("Content-Length", str(100 * 1024 * 1024))
    connection.endheaders()
    try:
        connection.send(b"\0" * (1 << 20))  # 1 MB of the declared 100: the answer comes anyway
    except (BrokenPipeError, ConnectionResetError):
        pass
    response = connection.getresponse()
    value = json.loads(response.read())
    connection.close()
    assert response.status == 413 and "over the limit of 20 MB" in value["error"]
    assert server.get("/api/v1/health")[1]["status"] == "ok"


@pytest.mark.parametrize(
    "query, says",
    [("k=0", "k must be"), ("k=many", "whole number"), ("min_score=high", "a number"), ("nprobe=0", "nprobe")],
)
def test_bad_parameters_are_400_with_the_reason(served, query, says):
    photos, ix, server = served
    status, value = server.post(f"/api/v1/search?{query}", (photos / "a" / "001.jpg").read_bytes(), check=False)
    assert status == 400 and says in value["error"]


def test_requests_that_cannot_write_are_refused(served):
    photos, ix, server = served
    before = sorted(p.name for p in ix.rglob("*"))
    for method in ("PUT", "DELETE", "PATCH"):
        assert server.request(method, "/api/v1/search")[0] == 405
        assert server.request(method, "/api/v1/image/1")[0] == 405
    assert server.request("POST", "/api/v1/info", b"{}")[0] == 405
    assert sorted(p.name for p in ix.rglob("*")) == before


def test_eight_concurrent_clients_get_whole_correct_answers(served):
    photos, ix, server = served
    images = sorted(photos.rglob("*.jpg"))[:8]

    def client(image):
        answers = []
        for _ in range(6):
            _, found = server.post(f"/api/v1/search?k=3&name={image.name}", image.read_bytes())
            answers.append(found["queries"][0])
        return image, answers

    with ThreadPoolExecutor(8) as pool:
        for image, answers in pool.map(client, images):
            assert all(a["query"] == image.name and a["results"][0]["path"] == str(image) for a in answers)
            assert all(a["results"] == answers[0]["results"] for a in answers)


def test_a_new_generation_is_served_without_restart_and_never_mixed(served, trained_run, tmp_path):
    photos = shutil.copytree(served[0], tmp_path / "photos")  # its own folder, index and server
    ix = tmp_path / "ix"
    build_index(photos, trained_run, ix, workers=0, device="cpu")
    original, copy = photos / "b" / "006.jpg", photos / "b" / "006-copy.jpg"
    data = original.read_bytes()
    stop = threading.Event()
    answers, failures = [], []
    with Server(ix) as server:

        def client():
            while not stop.is_set():
                status, value = server.post("/api/v1/search?k=2", data, check=False)
                (answers if status == 200 else failures).append(value)

        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            shutil.copy(original, copy)
            build_index(photos, trained_run, ix, workers=0, device="cpu")  # commits gen-000002
            seen_new = 0
            while seen_new < 5 and not failures:
                status, value = server.post("/api/v1/search?k=2", data, check=False)
                seen_new += value.get("generation") == "gen-000002"
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert server.get("/api/v1/health")[1]["generation"] == "gen-000002"
        assert server.get("/api/v1/info")[1]["vectors"] == 31
    assert not failures
    generations = {a["generation"] for a in answers}
    assert generations <= {"gen-000001", "gen-000002"} and answers
    for a in answers:  # each answer whole, from one generation: the copy only in the new one
        paths = {h["path"] for h in a["queries"][0]["results"]}
        assert (str(copy) in paths) == (a["generation"] == "gen-000002")
        assert str(original) in paths


def test_several_worker_processes_serve(served, capsys):
    photos, ix, _ = served
    image = photos / "c" / "001.jpg"
    with Server(ix, "--workers", "2") as server:
        for _ in range(4):
            _, found = server.post("/api/v1/search?k=1", image.read_bytes())
            assert found["queries"][0]["results"][0]["path"] == str(image)


def test_images_lists_the_index_page_by_page(served):
    photos, ix, server = served
    _, first = server.get("/api/v1/images?limit=20")
    _, rest = server.get("/api/v1/images?offset=20&limit=20")
    listed = first["images"] + rest["images"]
    assert first["total"] == rest["total"] == len(listed) and first["offset"] == 0 and rest["offset"] == 20
    assert sorted(i["path"] for i in listed) == sorted(str(p) for p in photos.rglob("*.jpg"))
    assert [i["id"] for i in listed] == sorted(i["id"] for i in listed)
    assert all(i["bytes"] == (photos / i["path"]).stat().st_size for i in listed)
    for bad in ("offset=-1", "limit=0", "limit=5000", "offset=x"):
        status, value = server.get(f"/api/v1/images?{bad}", check=False)
        assert status == 400 and set(value) == {"error"}
