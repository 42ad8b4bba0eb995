"""`instret serve`: a JSON API under /api/v1 and a search page, over one live index.

    GET  /api/v1/health                      {"status", "generation", "vectors"}
    GET  /api/v1/info                        what `instret info --json` prints
    GET  /api/v1/images?offset=0&limit=100   {"generation", "total", "offset", "images": [{"id", "path", "bytes"}]}
    POST /api/v1/search?k=&min_score=&nprobe=&existing_only=
         body: an image file's bytes, or multipart/form-data with one or more files
                                             {"generation", "queries": [what `query --json` prints, per image]}
    GET  /api/v1/search?id=ID&path=PATH...   the same, for images in the index (several allowed)
    GET  /api/v1/duplicates?precision=&threshold=&keep=&existing_only=
                                             {"generation", ...what `dups --json` prints}
    GET  /api/v1/duplicates/progress         {"running"} and, while groups are being found,
                                             {"stage": "search" | "verify", "done", "total", "seconds"}
    GET  /api/v1/image/ID                    the indexed file itself
    GET  /api/v1/thumbnail/ID?size=          a JPEG of it within size x size
    GET  /                                   the page (instret/web)

Results mark a file gone since it was indexed ("missing": true); existing_only=1 leaves such
files out. Every error is a 4xx or 5xx with {"error": one line}, and the server goes on serving. Only
files the index holds are ever read, by id; nothing a request sends is written anywhere
(uploads are parsed in memory, within --max-upload-mb, checked before the body is read).
"""

from __future__ import annotations

import io
import mimetypes
import os
import stat
import threading
import time
from email import policy
from email.parser import BytesParser
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from instret.defaults import DUPS_KEEP
from instret.duplicates import DEFAULT_PRECISION, find_duplicates
from instret.errors import InstretError
from instret.images import thumbnail as make_thumbnail
from instret.index import SearchIndex
from instret.info import index_info
from instret.live_index import LiveSearcher
from instret.searcher import Searcher

API = "/api/v1"
WEB = Path(__file__).parent / "web"
MAX_K = 1000
MAX_IMAGES = 32  # per request, uploaded or by id
MAX_PAGE = 1000  # images listed per request
THUMBNAIL_SIZES = (16, 512)
# Originals a browser does not display (HEIC from phones) are sent as a full-size JPEG instead.
BROWSERS_CANNOT_SHOW = frozenset({".heic", ".heif"})
FULL_SIZE = 1 << 16  # a thumbnail this large is the whole picture
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    # The page loads nothing from elsewhere and runs only its own script.
    (b"content-security-policy", b"default-src 'self'; img-src 'self' blob: data:; object-src 'none'"),
]


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def create_app(live: LiveSearcher, max_upload_bytes: int) -> Starlette:
    duplicates = _DuplicatesCache()

    # Each endpoint runs in a worker thread with the live generation's Searcher, taken once.
    def health(request: Request, searcher: Searcher):
        return {"status": "ok", "generation": searcher.index.generation, "vectors": searcher.index.ntotal}

    def info(request: Request, searcher: Searcher):
        return live.run(searcher, lambda s: index_info(s.index))

    def images(request: Request, searcher: Searcher):
        offset = _int(request.query_params.get("offset", "0"), "offset")
        limit = _int(request.query_params.get("limit", "100"), "limit")
        if offset < 0 or not 1 <= limit <= MAX_PAGE:
            raise RequestError(400, f"offset must be 0 or more and limit between 1 and {MAX_PAGE}")
        root = Path(searcher.index.manifest["root"])
        files = live.run(searcher, lambda s: s.index.files(offset, limit))
        return {
            "generation": searcher.index.generation,
            "total": searcher.index.ntotal,
            "offset": offset,
            "images": [{"id": i, "path": str(root / p), "bytes": size} for i, p, size, *_ in files],
        }

    def search_upload(request: Request, searcher: Searcher, uploads):
        k, min_score, nprobe = _search_options(request)
        existing_only = _flag(request, "existing_only")
        names, pictures = searcher.decode_uploads(uploads)  # outside the lock: decoding runs alongside
        queries = live.run(searcher, lambda s: s.query_decoded(names, pictures, k, min_score, existing_only), nprobe)
        return {"generation": searcher.index.generation, "queries": queries}

    def search_indexed(request: Request, searcher: Searcher):
        k, min_score, nprobe = _search_options(request)
        exclude_self, existing_only = _flag(request, "exclude_self"), _flag(request, "existing_only")

        def work(s: Searcher):
            ids = [_int(v, "id") for v in request.query_params.getlist("id")]
            for path in request.query_params.getlist("path"):
                found = s.index.id_of(path)
                if found is None:
                    raise RequestError(404, f"{path}: not in this index")
                ids.append(found)
            if not ids:
                raise RequestError(400, "give id=ID or path=PATH (or POST an image)")
            if len(ids) > MAX_IMAGES:
                raise RequestError(400, f"at most {MAX_IMAGES} images per request, not {len(ids)}")
            try:
                return s.query(
                    k=k, min_score=min_score, exclude_self=exclude_self, existing_only=existing_only, ids=ids
                )
            except InstretError as e:
                raise RequestError(404, str(e)) from None

        return {"generation": searcher.index.generation, "queries": live.run(searcher, work, nprobe)}

    def duplicate_groups(request: Request, searcher: Searcher):
        q = request.query_params
        threshold = _float(q["threshold"], "threshold") if "threshold" in q else None
        precision = _float(q["precision"], "precision") if "precision" in q else DEFAULT_PRECISION
        existing_only = _flag(request, "existing_only")
        found = duplicates.get(
            live.dir, searcher.index.generation, threshold, precision, q.get("keep", DUPS_KEEP), existing_only
        )
        # Computed once per generation; whether each file is still there is asked anew (a stat).
        groups = [
            {**g, "members": [{**m, "missing": not os.path.exists(m["path"])} for m in g["members"]]}
            for g in found["groups"]
        ]
        return {"generation": searcher.index.generation, **found, "groups": groups}

    def duplicates_progress(request: Request, searcher: Searcher):
        return duplicates.progress()

    def image(request: Request, searcher: Searcher):
        path = _indexed_file(live, searcher, request.path_params["id"])
        if Path(path).suffix.lower() in BROWSERS_CANNOT_SHOW:
            picture = make_thumbnail(path, FULL_SIZE)
            if picture is None:
                raise RequestError(404, f"image {request.path_params['id']} is unreadable")
            return _jpeg(picture, quality=92)
        return FileResponse(path, media_type=mimetypes.guess_type(path)[0] or "application/octet-stream")

    def thumbnail(request: Request, searcher: Searcher):
        size = _int(request.query_params.get("size", "160"), "size")
        if not THUMBNAIL_SIZES[0] <= size <= THUMBNAIL_SIZES[1]:
            raise RequestError(400, f"size must be between {THUMBNAIL_SIZES[0]} and {THUMBNAIL_SIZES[1]}")
        picture = make_thumbnail(_indexed_file(live, searcher, request.path_params["id"]), size)
        if picture is None:
            raise RequestError(404, f"image {request.path_params['id']} is unreadable")
        return _jpeg(picture, quality=85)

    async def page(request: Request):
        return FileResponse(WEB / "index.html", media_type="text/html")

    api = lambda endpoint, upload=False: _endpoint(live, endpoint, max_upload_bytes if upload else None)
    routes = [
        Route(f"{API}/health", api(health)),
        Route(f"{API}/info", api(info)),
        Route(f"{API}/images", api(images)),
        Route(f"{API}/search", api(search_upload, upload=True), methods=["POST"]),
        Route(f"{API}/search", api(search_indexed), methods=["GET"]),
        Route(f"{API}/duplicates", api(duplicate_groups)),
        Route(f"{API}/duplicates/progress", api(duplicates_progress)),
        Route(f"{API}/image/{{id:int}}", api(image)),
        Route(f"{API}/thumbnail/{{id:int}}", api(thumbnail)),
        Route("/", page),
        Mount("/static", StaticFiles(directory=WEB)),
    ]
    return Starlette(
        routes=routes,
        middleware=[Middleware(_SecurityHeaders)],
        exception_handlers={HTTPException: _http_error, Exception: _server_error},
    )


def _endpoint(live: LiveSearcher, work, upload_limit: int | None):
    """An ASGI endpoint: the upload read (when upload_limit is given), then work(request,
    searcher[, uploads]) in a worker thread, its dict answered as JSON (a Response as it is);
    RequestError and InstretError become {"error": ...} (400 for a library error: the request's
    fault)."""

    async def handler(request: Request):
        try:
            extra = [await _read_uploads(request, upload_limit)] if upload_limit else []
            result = await run_in_threadpool(lambda: work(request, live.current(), *extra))
        except RequestError as e:
            return _error(e.status, str(e))
        except InstretError as e:
            return _error(400, str(e))
        return result if isinstance(result, Response) else JSONResponse(result)

    return handler


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": " ".join(message.split())}, status_code=status)


async def _http_error(request: Request, e: HTTPException):
    return _error(e.status_code, e.detail if isinstance(e.detail, str) else "request refused")


async def _server_error(request: Request, e: Exception):
    return _error(500, f"unexpected {type(e).__name__}: {e}")


class _SecurityHeaders:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _search_options(request: Request) -> tuple[int, float | None, int | None]:
    q = request.query_params
    k = _int(q.get("k", "10"), "k")
    if not 1 <= k <= MAX_K:
        raise RequestError(400, f"k must be between 1 and {MAX_K}, not {k}")
    min_score = _float(q["min_score"], "min_score") if "min_score" in q else None
    nprobe = _int(q["nprobe"], "nprobe") if "nprobe" in q else None
    if nprobe is not None and nprobe < 1:
        raise RequestError(400, f"nprobe must be at least 1, not {nprobe}")
    return k, min_score, nprobe


def _flag(request: Request, name: str) -> bool:
    return request.query_params.get(name, "0").lower() in ("1", "true", "yes")


def _int(value: str, name: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise RequestError(400, f"{name} must be a whole number, not {value!r}") from None


def _float(value: str, name: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise RequestError(400, f"{name} must be a number, not {value!r}") from None


async def _read_uploads(request: Request, limit: int) -> list[tuple[str, bytes]]:
    """(name, bytes) of each image sent: the raw body (named by ?name=), or each file of a
    multipart/form-data body. The declared length is checked before anything is read."""
    length = request.headers.get("content-length")
    if length is None or not length.isdigit():
        raise RequestError(411, "send the upload with a Content-Length")
    if int(length) > limit:
        raise RequestError(
            413, f"upload of {int(length) / 1e6:.1f} MB is over the limit of {limit / 1e6:g} MB (--max-upload-mb)"
        )
    body = await request.body()
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        return [(request.query_params.get("name", "<upload>"), body)]
    message = BytesParser(policy=policy.HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    if not message.is_multipart():
        raise RequestError(400, "a multipart/form-data body that does not parse")
    files = [part for part in message.iter_parts() if part.get_filename() is not None]
    if not files:
        raise RequestError(400, "no image file in the form")
    if len(files) > MAX_IMAGES:
        raise RequestError(400, f"at most {MAX_IMAGES} images per request, not {len(files)}")
    return [
        (part.get_filename() or f"<upload {i}>", part.get_payload(decode=True) or b"") for i, part in enumerate(files)
    ]


def _jpeg(picture, quality: int) -> Response:
    buf = io.BytesIO()
    picture.save(buf, format="JPEG", quality=quality)
    return Response(buf.getvalue(), media_type="image/jpeg", headers={"cache-control": "max-age=300"})


def _indexed_file(live: LiveSearcher, searcher: Searcher, id_: int) -> str:
    """The path of indexed file `id_`, if it is still a regular file on disk."""
    path = live.run(searcher, lambda s: s.index.paths_of([id_])).get(id_)
    if path is None:
        raise RequestError(404, f"no image with id {id_} in this index")
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise RequestError(404, f"image {id_} is not a regular file now")
    except OSError:
        raise RequestError(404, f"image {id_} is no longer on disk") from None
    return path


class _DuplicatesCache:
    """Duplicate groups per generation and settings: a range search over the whole index is
    worth doing once. Each is computed on its own opening of the generation, so searches are
    not held up, and only the live generation's are kept. progress() says where the one being
    computed stands (a large folder takes minutes), for the page to show while it waits."""

    def __init__(self):
        self._lock = threading.Lock()
        self._found: dict[tuple, dict] = {}
        self._progress: dict = {"running": False}

    def get(self, index_dir: Path, generation: str, threshold, precision, keep, existing_only: bool) -> dict:
        key = (generation, threshold, precision, keep, existing_only)
        with self._lock:
            if key not in self._found:
                started = time.monotonic()

                def tell(stage: str, done: int, total: int) -> None:
                    self._progress = {"running": True, "stage": stage, "done": done, "total": total, "started": started}

                index = SearchIndex(index_dir, generation=generation)
                try:
                    found = find_duplicates(index, threshold, precision, keep, existing_only, progress=tell)
                finally:
                    index.close()
                    self._progress = {"running": False}
                self._found = {k: v for k, v in self._found.items() if k[0] == generation}
                self._found[key] = found
            return self._found[key]

    def progress(self) -> dict:
        """{"running": false}, or {"running": true, "stage", "done", "total", "seconds"} of the
        groups being found (find_duplicates' stages: "search", then "verify" pairs checked)."""
        now = dict(self._progress)  # one read: a computation may replace it meanwhile
        if now["running"]:
            now["seconds"] = round(time.monotonic() - now.pop("started"), 1)
        return now
