"""Every SQLite statement of instret, in one place: a generation's meta.sqlite (which file each
id is, and the files skipped) and an index's staging.sqlite (vectors encoded by a build not yet
committed). Paths are stored as text, or as raw bytes when a name is not valid UTF-8."""

from __future__ import annotations

import heapq
import os
import sqlite3
from collections.abc import Iterable, Iterator
from itertools import chain
from pathlib import Path

import numpy as np

from instret.errors import InstretError

SQL_PARAMETERS = 900  # bound parameters per statement, under SQLite's limit of 999
SCHEMA = """
CREATE TABLE IF NOT EXISTS files (id INTEGER PRIMARY KEY, path TEXT UNIQUE NOT NULL,
    size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, sha256 TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS skipped (path TEXT PRIMARY KEY, reason TEXT NOT NULL);
"""
FILE_COLUMNS = "id, path, size, mtime_ns, sha256"


def to_db(path: str) -> str | bytes:
    """A path for SQLite: text when it is valid UTF-8, else its raw bytes (names on Linux may
    hold any bytes; Python carries them as surrogates, which SQLite's text refuses)."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return os.fsencode(path)


def from_db(value: str | bytes) -> str:
    return os.fsdecode(value) if isinstance(value, bytes) else value


# --- meta.sqlite ---------------------------------------------------------------------------


def open_metadata(path: Path, readonly: bool = False) -> sqlite3.Connection:
    try:
        if readonly:
            # Shared by a server's threads (instret.live_index serialises them): read-only, so safe.
            con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
            con.execute("SELECT count(*) FROM files").fetchone()
        else:
            con = sqlite3.connect(path)
            con.executescript(SCHEMA)
    except sqlite3.Error as e:
        raise InstretError(f"{path}: metadata unreadable ({e}); the index is damaged, rebuild it") from None
    return con


def write_files(con: sqlite3.Connection, files: Iterable[tuple], skipped: list[tuple[str, str]]) -> None:
    """A new generation's rows: (id, path, size, mtime_ns, sha256), in any order and read once
    (a generator keeps a million of them out of memory), and (path, reason)."""
    with con:
        con.executemany("INSERT INTO files VALUES (?, ?, ?, ?, ?)", ((i, to_db(p), *r) for i, p, *r in files))
        con.executemany("INSERT INTO skipped VALUES (?, ?)", [(to_db(p), r) for p, r in skipped])


def file_rows(con: sqlite3.Connection, ids) -> list[tuple[int, str, int, int, str]]:
    """(id, path, size, mtime_ns, sha256) of the given ids (any order; ids not held are absent)."""
    ids, rows = list(ids), []
    for start in range(0, len(ids), SQL_PARAMETERS):
        chunk = ids[start : start + SQL_PARAMETERS]
        query = f"SELECT {FILE_COLUMNS} FROM files WHERE id IN ({','.join('?' * len(chunk))})"
        rows += [(i, from_db(p), *rest) for i, p, *rest in con.execute(query, chunk)]
    return rows


def id_of(con: sqlite3.Connection, relative: str) -> int | None:
    row = con.execute("SELECT id FROM files WHERE path = ?", (to_db(relative),)).fetchone()
    return None if row is None else int(row[0])


def files_page(con: sqlite3.Connection, offset: int = 0, limit: int = -1) -> list[tuple[int, str, int, int, str]]:
    """(id, path, size, mtime_ns, sha256) in id order: all, or a page."""
    rows = con.execute(f"SELECT {FILE_COLUMNS} FROM files ORDER BY id LIMIT ? OFFSET ?", (limit, offset))
    return [(i, from_db(p), *rest) for i, p, *rest in rows]


def files_in_path_order(con: sqlite3.Connection) -> Iterator[tuple[int, str, int, int, str]]:
    """(id, path, size, mtime_ns, sha256) in the order Python sorts the paths, streamed. SQLite
    orders text by its UTF-8 bytes, which is code point order; names kept as raw bytes (not
    valid UTF-8, few) come after all text there, so they are merged in by Python's order."""
    text = con.execute(f"SELECT {FILE_COLUMNS} FROM files WHERE typeof(path) = 'text' ORDER BY path")
    raw = con.execute(f"SELECT {FILE_COLUMNS} FROM files WHERE typeof(path) != 'text'")
    raw = sorted(((i, from_db(p), *rest) for i, p, *rest in raw), key=lambda r: r[1])
    return heapq.merge(text, raw, key=lambda r: r[1])


def skipped_files(con: sqlite3.Connection) -> list[tuple[str, str]]:
    return [(from_db(p), r) for p, r in con.execute("SELECT path, reason FROM skipped ORDER BY path")]


def content_representatives(con: sqlite3.Connection, ids: np.ndarray) -> np.ndarray:
    """For each id (ascending), the lowest id with the same bytes (its own when it is unique);
    streamed into an array, so that a million files cost 16 MB, not a dict."""
    rows = con.execute("SELECT id, MIN(id) OVER (PARTITION BY sha256) FROM files ORDER BY id")
    pairs = np.fromiter(chain.from_iterable(rows), np.int64).reshape(-1, 2)
    if not np.array_equal(pairs[:, 0], ids):
        raise InstretError("the index's metadata and vectors list different files; the index is damaged, rebuild it")
    return pairs[:, 1]


# --- staging.sqlite --------------------------------------------------------------------------


class Staging:
    """Vectors encoded by this (or an interrupted earlier) build, committed batch by batch and
    keyed by path, size and mtime; rows of another encoder are dropped on opening."""

    def __init__(self, path: Path, fingerprint: str):
        self.path = path
        self.con = sqlite3.connect(path)
        # WAL: a commit per batch survives the process being killed without an fsync per batch.
        self.con.execute("PRAGMA journal_mode=WAL")
        self.con.execute("PRAGMA synchronous=NORMAL")
        self.con.execute(
            "CREATE TABLE IF NOT EXISTS staged (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER,"
            " sha256 TEXT, fingerprint TEXT, vector BLOB)"
        )
        self.con.execute("DELETE FROM staged WHERE fingerprint != ?", (fingerprint,))
        self.con.commit()
        self.fingerprint = fingerprint

    def lookup(self, rel: str, size: int, mtime_ns: int) -> tuple[str, np.ndarray] | None:
        """(sha256, vector) staged for this file as it is now, or None."""
        row = self.con.execute(
            "SELECT sha256, vector FROM staged WHERE path = ? AND size = ? AND mtime_ns = ?",
            (to_db(rel), size, mtime_ns),
        ).fetchone()
        return None if row is None else (row[0], np.frombuffer(row[1], dtype=np.float32))

    def add(self, rows: list[tuple[str, int, int, str, np.ndarray]]) -> None:
        """One committed batch of (path, size, mtime_ns, sha256, vector)."""
        try:
            with self.con:
                self.con.executemany(
                    "INSERT OR REPLACE INTO staged VALUES (?, ?, ?, ?, ?, ?)",
                    [
                        (to_db(rel), size, mtime, h, self.fingerprint, v.astype(np.float32).tobytes())
                        for rel, size, mtime, h, v in rows
                    ],
                )
        except sqlite3.Error as e:
            raise InstretError(
                f"{self.path}: cannot write ({e}); the batches staged "
                f"before are kept, and rerunning `instret index` continues from them"
            ) from None

    def close(self) -> None:
        self.con.close()
