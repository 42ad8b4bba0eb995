"""Near-duplicate groups of an index: byte copies, then edited copies, in groups that never chain.

Tiers. Files with the same bytes (the sha256 in meta.sqlite) are "exact" duplicates. Distinct
contents whose vectors score at least the threshold are "near" duplicates: the same photo
re-encoded, resized, cropped or recoloured. A group holding two or more distinct contents is
"near"; its byte copies are marked "identical".

No chaining. Groups are complete-linkage: every member scores at least the threshold with
every other member, so a chain a~b~c never joins a and c through b, and whichever member
`keep` picks, everything else in its group is a near copy of it. Pairs are joined strongest
first; a group grows only while all its pairs stay above the threshold. A file is in one
group at most.

The threshold. With a wanted precision (the default, 0.99), it is the lowest score at which
the pairs found are still that precise by the index's own calibration (instret.calibration):
scanning the candidate pairs from the best down, at each score t the expected number of
unrelated pairs is (pairs of distinct images) x (share of unrelated pairs at or above t), and
the estimated precision is 1 - expected unrelated / pairs found; the scan stops at the first
score where that falls below the precision. A raw threshold can be given instead. Indexes
built before the calibration existed use FALLBACK_THRESHOLD.

Scale. The candidate pairs come from range searches of the index by blocks of BLOCK vectors,
through the index's own layout (exhaustive for Flat, an IVF layout visits nprobe lists), at a
floor where the calibration expects about one unrelated pair per image, keeping each image's
PER_IMAGE best: memory holds a block of vectors and at most PER_IMAGE candidate pairs per
image, never an n x n matrix.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from instret import moves
from instret.calibration import describe, score_for_unrelated_share, unrelated_share
from instret.defaults import DUPS_KEEP
from instret.defaults import DUPS_PRECISION as DEFAULT_PRECISION
from instret.errors import InstretError
from instret.index import SearchIndex
from instret.metadata import content_representatives, file_rows
from instret.verify import Verdict, verify_pairs

FALLBACK_THRESHOLD = 0.95  # indexes without score distributions
BLOCK = 4096  # query vectors per range search
PER_IMAGE = 32  # candidate pairs kept per image (its best): more near copies of one photo is rare
VERIFY_MAX_PAIRS = 20_000  # pairs verified at most (about 15 minutes on one core): the strongest


@dataclass
class Member:
    id: int
    path: str  # absolute
    bytes: int
    mtime_ns: int
    sha256: str
    width: int = 0  # 0 x 0: the file cannot be read now
    height: int = 0
    missing: bool = False  # gone since it was indexed

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def present(self) -> bool:
        return self.width > 0


# Which member of a group is kept; the rest are its duplicates. Missing files are never kept.
KEEP_RULES = {
    "largest": lambda m: (not m.present, -m.pixels, m.mtime_ns, m.path),  # then oldest, then path
    "oldest": lambda m: (not m.present, m.mtime_ns, -m.pixels, m.path),
    "newest": lambda m: (not m.present, -m.mtime_ns, -m.pixels, m.path),
    "path": lambda m: (not m.present, m.path),
}


# --- candidate pairs ---------------------------------------------------------------------


def candidate_pairs(
    within,
    vectors,
    floor: float,
    rep_row: np.ndarray | None = None,
    ids: np.ndarray | None = None,
    block: int = BLOCK,
    per_image: int = PER_IMAGE,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs of distinct rows scoring above `floor`, each once: (row a < row b, score); each
    row's `per_image` best at most, which bounds memory whatever the collection holds.

    within(vectors) -> (query row, id, score) (SearchIndex.within); vectors: n x D rows (a
    memory map is read block by block); ids: the id of each row (ascending; default the row
    number); rep_row: the row standing for each row's content (byte copies share one): only
    those rows query, and hits are folded onto them."""
    n = len(vectors)
    ids = np.arange(n, dtype=np.int64) if ids is None else ids
    rep_row = np.arange(n) if rep_row is None else rep_row
    found_a, found_b, found_s = [], [], []
    for start in range(0, n, block):
        rows = np.arange(start, min(start + block, n))
        rows = rows[rep_row[rows] == rows]
        if not len(rows):
            continue
        q, hit_ids, scores = within(np.asarray(vectors[rows]), floor)
        a, b = rows[q], rep_row[np.searchsorted(ids, hit_ids)]
        keep = a != b  # itself, or a byte copy of itself
        a, b, scores = _closest(*_best_of_each_pair(a[keep], b[keep], scores[keep]), per_image)
        found_a.append(np.minimum(a, b))
        found_b.append(np.maximum(a, b))
        found_s.append(scores)
    if not found_a:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32)
    # Found from both ends (or once, by an approximate layout): each pair once, its best score.
    return _best_of_each_pair(np.concatenate(found_a), np.concatenate(found_b), np.concatenate(found_s))


def _best_of_each_pair(a: np.ndarray, b: np.ndarray, s: np.ndarray):
    """Each (a, b) once, with its best score; sorted by a, then b."""
    order = np.lexsort((-s, b, a))
    a, b, s = a[order], b[order], s[order]
    first = np.ones(len(a), bool)
    first[1:] = (a[1:] != a[:-1]) | (b[1:] != b[:-1])
    return a[first], b[first], s[first]


def _closest(a: np.ndarray, b: np.ndarray, s: np.ndarray, per_image: int):
    """The `per_image` best pairs of each a."""
    order = np.lexsort((-s, a))
    a, b, s = a[order], b[order], s[order]
    rank = np.arange(len(a)) - np.searchsorted(a, a)  # position among a's own pairs
    keep = rank < per_image
    return a[keep], b[keep], s[keep]


# --- the threshold -----------------------------------------------------------------------


def search_floor(distributions: dict | None, contents: int, threshold: float | None) -> float:
    """The lowest score worth a candidate pair: the raw threshold, or where the calibration
    expects about one unrelated pair per distinct image (the precision threshold lies above)."""
    if threshold is not None:
        return threshold - 1e-6  # range search keeps scores above the radius: keep those equal too
    if not distributions:
        return FALLBACK_THRESHOLD - 1e-6
    return score_for_unrelated_share(contents / max(1.0, _pairs(contents)), distributions)


def threshold_for_precision(scores: np.ndarray, contents: int, distributions: dict, precision: float) -> dict:
    """{"threshold", "pairs", "expected_unrelated"}: the lowest candidate score t at which the
    pairs scoring t or more are estimated `precision` precise (a step-up rule, as
    Benjamini-Hochberg's: a few pairs at the very top may look less certain than the many
    just below them, so the whole list is scanned)."""
    desc = np.sort(np.asarray(scores, dtype=np.float64))[::-1]
    expected = _pairs(contents) * unrelated_share(desc, distributions) if len(desc) else np.empty(0)
    estimated = 1.0 - expected / np.arange(1, len(desc) + 1)
    passing = np.flatnonzero(estimated >= precision)
    last = passing[-1] if len(passing) else -1
    if last < 0:  # no pair: the score at which one pair alone would be precise enough
        t = score_for_unrelated_share((1.0 - precision) / max(1.0, _pairs(contents)), distributions)
        return {"threshold": round(float(t), 6), "pairs": 0, "expected_unrelated": 0.0}
    return {
        "threshold": round(float(desc[last]), 6),
        "pairs": int(last) + 1,
        "expected_unrelated": round(float(expected[last]), 2),
    }


def _pairs(contents: int) -> float:
    return contents * (contents - 1) / 2


# --- verification --------------------------------------------------------------------------


def verify_floor(distributions: dict | None, floor: float) -> float | None:
    """The lowest score a pair is verified at: the search floor, so that every candidate pair is
    (about one per image: the cost is bounded, and an edited copy that a briefly trained
    encoder scores lower than most copies is still found; it once stopped where 98 % of edited
    copies score, which left 2 % of copies unchecked by design). None for an index without
    edited-copy scores (built from vectors, not images: there is nothing to align)."""
    if not distributions or "copies" not in distributions:
        return None
    return floor


def _verify_pairs(
    index: SearchIndex, ids: np.ndarray, a: np.ndarray, b: np.ndarray, strict: np.ndarray, progress=None
) -> dict:
    """{(row a, row b): Verdict} of each pair's two files (instret.verify.verify_pairs); a pair with
    `strict` set (one the threshold alone would not group) is checked strictly (instret.verify)."""
    paths = index.paths_of({int(ids[r]) for r in np.concatenate([a, b])})
    order = np.lexsort((b, a))  # pairs of one file together: a worker then decodes it once
    jobs = [(paths[int(ids[a[k]])], paths[int(ids[b[k]])], bool(strict[k])) for k in order]
    return {(int(a[k]), int(b[k])): v for k, v in zip(order, verify_pairs(jobs, progress=progress))}


# --- groups ------------------------------------------------------------------------------


def complete_linkage(a: np.ndarray, b: np.ndarray, s: np.ndarray, threshold: float) -> list[list[int]]:
    """Groups (of 2 or more) in which every two members have a pair scoring >= threshold,
    joined strongest pair first; each row in one group at most."""
    keep = s >= threshold
    a, b, s = a[keep], b[keep], s[keep]
    linked = set(zip(a.tolist(), b.tolist()))
    group_of: dict[int, list[int]] = {}
    for i in np.lexsort((b, a, -s)):
        x, y = int(a[i]), int(b[i])
        gx, gy = group_of.get(x, [x]), group_of.get(y, [y])
        if gx is gy:
            continue
        if all((min(u, v), max(u, v)) in linked for u in gx for v in gy):
            gx.extend(gy)
            for member in gx:
                group_of[member] = gx
    groups = {id(g): g for g in group_of.values()}
    return [sorted(g) for g in groups.values()]


def find_duplicates(
    index_dir: str | Path | SearchIndex,
    threshold: float | None = None,
    precision: float = DEFAULT_PRECISION,
    keep: str = DUPS_KEEP,
    existing_only: bool = False,
    move_to: str | Path | None = None,
    verify: bool = True,
    progress=None,
) -> dict:
    """{"threshold", "reason", "keep_rule", "groups": [{"tier", "keep", "min_score", "members"}]}
    of an index (a folder, or one opened already: a server's generation): exact groups first,
    then near ones, largest first. `threshold` (a cosine similarity) overrides the one
    calibrated for `precision`. A member whose file is gone since it was indexed is marked
    "missing" (never kept while another is there); existing_only leaves such files out, and a
    group left with one member with them.

    verify: every candidate pair (about one per image), above the calibrated threshold or below
    it, is checked by aligning the two images (instret.verify) and grouped only when they align; each member then says what
    confirmed it ("confirmed"). A raw threshold is taken as given.

    move_to: a folder outside the indexed one; every member but the kept one moves there (under
    its path below the indexed folder), a journal written first (instret.moves; `instret dups
    --undo JOURNAL` puts them back). The answer then also holds "moves" (moves.move_duplicates').

    progress(stage, done, total), when given, is told where the work stands: "search" (0, 0) as
    the index is searched for candidate pairs, then "verify" (pairs checked, pairs to check) as
    they are aligned; on a large folder either can take minutes."""
    if keep not in KEEP_RULES:
        raise InstretError(f"--keep must be one of {', '.join(KEEP_RULES)}, not {keep!r}")
    if threshold is None and not 0 < precision < 1:
        raise InstretError(f"--precision must be between 0 and 1 (exclusive), not {precision}")
    index = index_dir if isinstance(index_dir, SearchIndex) else SearchIndex(index_dir)
    root = Path(index.manifest["root"])
    if move_to is not None:  # refused before the search, which may take minutes
        moves.check_destination(root, Path(os.path.abspath(move_to)))
    vectors, ids = index.vectors()
    rep_row = np.searchsorted(ids, content_representatives(index.meta, ids))
    contents = int((rep_row == np.arange(len(ids))).sum())
    distributions = index.manifest.get("scores")
    floor = search_floor(distributions, contents, threshold)
    tell = progress or (lambda stage, done, total: None)
    tell("search", 0, 0)
    a, b, s = candidate_pairs(index.within, vectors, floor, rep_row, ids)
    choice = _threshold(s, contents, distributions, threshold, precision)
    accepted = s >= choice["threshold"]
    verdicts: dict[tuple[int, int], Verdict] = {}
    low = verify_floor(distributions, floor) if verify and threshold is None else None
    if low is not None:
        # Every candidate pair is checked, those above the threshold too: an encoder after a
        # short training also scores two photos of one sky high.
        checked = np.flatnonzero(s >= low)
        capped = len(checked) > VERIFY_MAX_PAIRS
        if capped:  # the strongest pairs; the rest keep the threshold's decision
            checked = checked[np.argsort(-s[checked], kind="stable")[:VERIFY_MAX_PAIRS]]
        above = accepted[checked]
        tell("verify", 0, len(checked))
        verdicts = _verify_pairs(
            index, ids, a[checked], b[checked], strict=~above, progress=functools.partial(tell, "verify")
        )
        confirmed = np.array([verdicts[(int(a[k]), int(b[k]))].copy for k in checked], dtype=bool)
        accepted[checked] = confirmed
        choice["reason"] += (
            f"; every candidate pair (scoring at least {low:.4f}, where about one unrelated pair per image is "
            f"expected) was checked by aligning the two images: {int(confirmed[above].sum())} of {int(above.sum())} at or above "
            f"the threshold and {int(confirmed[~above].sum())} of {int((~above).sum())} below it (checked strictly) were "
            "confirmed"
            + (
                f" (the {VERIFY_MAX_PAIRS:,} strongest pairs; the others kept the threshold's decision)"
                if capped
                else ""
            )
        )
    near = complete_linkage(a[accepted], b[accepted], s[accepted], -np.inf)
    grouped = {r for g in near for r in g}
    exact = [[r] for r in np.unique(rep_row[rep_row != np.arange(len(ids))]).tolist() if r not in grouped]
    # The rows of each content, found by one sort rather than a scan of every row per group.
    by_content = np.argsort(rep_row, kind="stable")
    edges = np.searchsorted(rep_row[by_content], np.arange(len(ids) + 1))
    files_of = lambda reps: np.sort(np.concatenate([by_content[edges[r] : edges[r + 1]] for r in reps]))

    def confirm(kept_row: int, row: int, score: float) -> dict:
        """What makes a member a copy of the kept one (rows of the same content share a verdict)."""
        pair = tuple(sorted((int(rep_row[kept_row]), int(rep_row[row]))))
        if pair in verdicts:
            return verdicts[pair].as_json()
        return {
            "by": "similarity",
            "score": round(score, 4),
            "reason": f"similarity {score:.4f} >= {choice['threshold']:.4f}",
        }

    groups = [
        _describe_group(index, vectors, ids, files_of(reps), keep, existing_only, confirm) for reps in exact + near
    ]
    groups = [g for g in groups if g is not None]
    groups.sort(key=lambda g: (g["tier"] != "exact", -len(g["members"]), g["keep"]))
    if index is not index_dir:
        index.close()
    found = {**choice, "keep_rule": keep, "groups": groups}
    if move_to is not None:
        found["moves"] = moves.move_duplicates(groups, root, Path(move_to))
    return found


def _threshold(s, contents, distributions, threshold, precision) -> dict:
    if threshold is not None:
        return {"threshold": threshold, "reason": f"--threshold {threshold}, as given"}
    if not distributions:
        return {
            "threshold": FALLBACK_THRESHOLD,
            "reason": f"{FALLBACK_THRESHOLD}: this index has no score distributions to calibrate with "
            f"(built by an older instret; `instret index --rebuild` measures them)",
        }
    found = threshold_for_precision(s, contents, distributions, precision)
    t = found["threshold"]
    copies = ""
    if "copies" in distributions:
        share = 1.0 - describe(t, distributions)["copies_below"]
        copies = f"; {share:.0%} of edited copies of this index's images (instret.edits) score at least this"
    reason = (
        f"--precision {precision}: calibrated on this index, {found['pairs']} pair(s) of distinct images "
        f"score at least {t:.4f}, of which about {found['expected_unrelated']:g} would be unrelated "
        f"images by chance{copies}"
    )
    return {**found, "precision": precision, "reason": reason}


def _describe_group(
    index: SearchIndex, vectors, ids, rows: np.ndarray, keep: str, existing_only: bool, confirm=None
) -> dict | None:
    """The JSON of one group of files (rows, ascending: every byte copy of every content in it):
    the kept one, and each member's score with the kept one and what confirmed it (confirm(kept
    row, row, score); byte copies are confirmed by their bytes). None when existing_only leaves
    fewer than two."""
    members = _members(index, [int(ids[r]) for r in rows])
    if existing_only:
        members = [m for m in members if not m.missing]
        there = {m.id for m in members}
        rows = np.array([r for r in rows if int(ids[r]) in there], dtype=np.int64)
        if len(members) < 2:
            return None
    kept = min(members, key=KEEP_RULES[keep])
    searched = index.transform(np.asarray(vectors[rows]))
    position = {int(ids[r]): i for i, r in enumerate(rows)}  # id -> its row of `searched`
    kept_vec = searched[position[kept.id]]
    out = []
    for m in sorted(members, key=KEEP_RULES[keep]):
        identical = m.sha256 == kept.sha256
        score = 1.0 if identical else float(searched[position[m.id]] @ kept_vec)
        if m is kept:
            confirmed = None
        elif identical:
            confirmed = {"by": "bytes", "score": 1.0, "reason": "the same bytes (SHA-256)"}
        else:
            confirmed = confirm(int(rows[position[kept.id]]), int(rows[position[m.id]]), score) if confirm else None
        out.append(
            {
                "id": m.id,
                "path": m.path,
                "score": round(score, 6),
                "identical": identical,
                "missing": m.missing,
                "width": m.width,
                "height": m.height,
                "bytes": m.bytes,
                "modified": _iso(m.mtime_ns),
                "confirmed": confirmed,
            }
        )
    pair_scores = searched @ searched.T
    distinct = len({m.sha256 for m in members})
    return {
        "tier": "near" if distinct > 1 else "exact",
        "keep": kept.path,
        "min_score": round(float(pair_scores.min()), 6),
        "members": out,
    }


def _members(index: SearchIndex, member_ids: list[int]) -> list[Member]:
    root = Path(index.manifest["root"])
    rows = file_rows(index.meta, member_ids)
    members = [Member(i, str(root / p), size, mtime, sha) for i, p, size, mtime, sha in rows]
    for m in members:
        m.missing = not os.path.exists(m.path)
        m.width, m.height = _image_size(m.path)
    return members


def _image_size(path: str) -> tuple[int, int]:
    """(width, height) from the file's header, upright; (0, 0) when it cannot be read now."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            w, h = img.size
            orientation = img.getexif().get(0x0112, 1)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
        return 0, 0
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def _iso(mtime_ns: int) -> str:
    return datetime.fromtimestamp(mtime_ns / 1e9, timezone.utc).isoformat(timespec="seconds")
