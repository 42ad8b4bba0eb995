"""The index a server searches: the live generation's Searcher, switched between requests when
`instret index` commits a new one.

A request takes `current()` once and does all its work with that Searcher, so every answer
comes whole from one generation, never a mix; a request that began before a switch finishes on
the generation it started with (the writer keeps the previous one on disk, and open files stay
readable on POSIX even after it goes).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from instret.defaults import QUERY_DEVICE
from instret.errors import InstretError
from instret.faiss_boundary import set_search_breadth
from instret.locations import index_folder, read_current
from instret.searcher import Searcher


class LiveSearcher:
    def __init__(
        self,
        index_dir: str | Path,
        device: str = QUERY_DEVICE,
        max_pixels: int | None = None,
        nprobe: int | None = None,
        log: Callable[[str], None] = print,
    ):
        self.dir = index_folder(index_dir)
        self._options = dict(device=device, max_pixels=max_pixels, nprobe=nprobe)
        self._log = log
        self._switching = threading.Lock()
        # One search at a time: torch and FAISS already spread each one over every core, and the
        # index's SQLite connection and search breadth are shared.
        self._searching = threading.Lock()
        self._unopenable = None  # a generation that failed to open: not retried on every request
        self.searcher = Searcher(self.dir, **self._options)

    def current(self) -> Searcher:
        """The Searcher of the live generation, opening it first if `instret index` has
        committed a new one since the last request. A new generation that cannot be opened
        is reported once, and the one before keeps serving."""
        searcher = self.searcher
        try:
            name = read_current(self.dir)
        except InstretError:
            return searcher
        if name in (searcher.index.generation, self._unopenable):
            return searcher
        with self._switching:
            if read_current(self.dir) != self.searcher.index.generation:
                old = self.searcher.index.generation
                try:
                    self.searcher = Searcher(self.dir, **self._options)
                    self._log(f"switched from {old} to {self.searcher.index.generation}")
                except InstretError as e:
                    self._unopenable = name
                    self._log(f"kept serving {old}: {e}")
        return self.searcher

    def run(self, searcher: Searcher, work: Callable[[Searcher], object], nprobe: int | None = None):
        """work(searcher) alone, with this request's nprobe (IVF layouts) for its duration."""
        with self._searching:
            if nprobe is None:
                return work(searcher)
            index = searcher.index
            set_search_breadth(index.faiss_index(), nprobe, index.breadth[1])
            try:
                return work(searcher)
            finally:
                set_search_breadth(index.faiss_index(), *index.breadth)
