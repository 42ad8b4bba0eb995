"""Acting on duplicate groups without losing anything: moves with a journal, undo, review links.

A move plan is written to a journal (DEST/instret-dups-YYYYmmdd-HHMMSS.json, atomically)
before any file moves: every file to move, where it goes (DEST + its path under the indexed
folder) and its sha256. Each move is a hard link at the destination, then the source's
removal (across file systems: a copy to a temporary name, synced, linked into place, then the
source removed), so at every instant the file exists at its source, its destination, or both
with the same bytes. Nothing overwrites a file and nothing deletes one unless an identical
copy stays. Because the state of each move can be read off the disk, a journal says all that
is needed to finish an interrupted run (`complete`) or to put everything back (`undo`).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from pathlib import Path

from instret.errors import InstretError
from instret.images import file_sha256
from instret.storage import atomic_write_text

JOURNAL_GLOB = "instret-dups-*.json"
PARTIAL = ".instret-partial"  # suffix of a copy in progress across file systems


def check_destination(root: Path, dest: Path) -> None:
    """Refuse a destination inside the indexed folder: the next `instret index` would index the
    moved copies again."""
    if dest.resolve() == root.resolve() or root.resolve() in dest.resolve().parents:
        raise InstretError(
            f"--move-to {dest} is inside the indexed folder {root}: the next `instret index` "
            f"would index the moved copies again; choose a folder outside it"
        )


def move_duplicates(groups: list[dict], root: Path, dest: Path) -> dict:
    """Finish any interrupted move into dest, then move every member of each group but the kept
    one there (under its path below root), journal first. {"finished": [{"journal", "moved"}],
    "notes": [why a member stays], "journal": this run's journal or None, "moved": files moved}."""
    dest = Path(os.path.abspath(dest))  # the journal holds absolute paths
    check_destination(root, dest)
    finished = [{"journal": str(j), "moved": _complete_or_say(j)["moved"]} for j in unfinished(dest)]
    plan, notes = plan_moves(groups, root, dest)
    if not plan:
        return {"finished": finished, "notes": notes, "journal": None, "moved": 0}
    journal = write_journal(dest, plan, root)
    return {"finished": finished, "notes": notes, "journal": str(journal), "moved": _complete_or_say(journal)["moved"]}


def _complete_or_say(journal: Path) -> dict:
    """complete(), with an interrupt turned into the one line that says how to go on."""
    from instret.invocation import command_line

    try:
        return complete(journal)
    except KeyboardInterrupt:
        raise InstretError(
            f"interrupted; {journal} records every move: rerun the same command to finish them, "
            f"or undo them with: {command_line('dups', '--undo', journal)}"
        ) from None


def plan_moves(groups: list[dict], root: Path, dest: Path) -> tuple[list[dict], list[str]]:
    """The moves that take every member but the kept one of each group to dest, keeping its
    path under root. Returns (moves, notes on members left where they are)."""
    moves, notes = [], []
    for n, g in enumerate(groups, 1):
        for m in g["members"]:
            if m["path"] == g["keep"]:
                continue
            src = Path(m["path"])
            if not os.path.lexists(src):
                notes.append(f"{src}: no longer there; left alone")
                continue
            moves.append({"group": n, "from": str(src), "to": str(dest / src.relative_to(root)), "bytes": m["bytes"]})
    return moves, notes


def write_journal(dest: Path, moves: list[dict], root: Path) -> Path:
    """The journal of a move plan, written (atomically) before anything moves."""
    for m in moves:
        m["sha256"] = file_sha256(m["from"])
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / time.strftime("instret-dups-%Y%m%d-%H%M%S.json")
    while path.exists():
        path = path.with_name(path.stem + "-1.json")
    atomic_write_text(
        path, json.dumps({"version": 1, "root": str(root), "dest": str(dest), "moves": moves}, indent=1) + "\n"
    )
    return path


def read_journal(path: str | Path) -> dict:
    try:
        journal = json.loads(Path(path).read_text())
        if journal.get("version") != 1 or not isinstance(journal.get("moves"), list):
            raise ValueError
        return journal
    except (OSError, ValueError, AttributeError):
        raise InstretError(f"{path}: not an instret dups journal (or unreadable)") from None


def complete(path: str | Path) -> dict:
    """Carry out every move of a journal that is not done yet: {"moved", "already_moved"}."""
    changed, already = _settle(path, forward=True)
    return {"moved": changed, "already_moved": already}


def undo(path: str | Path) -> dict:
    """Put every file of a journal back where it was: {"restored", "already_in_place"}. The
    journal is marked first, so that a rerun of the move never redoes what an undo began."""
    journal = read_journal(path)
    if "undo" not in journal:
        atomic_write_text(path, json.dumps({**journal, "undo": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1) + "\n")
    changed, already = _settle(path, forward=False)
    return {"restored": changed, "already_in_place": already}


def _settle(path: str | Path, forward: bool) -> tuple[int, int]:
    """Bring each file of the journal to its destination (forward) or back to its source, from
    whatever state a run left it in. Returns (files brought, files already there)."""
    journal = read_journal(path)
    if forward and "undo" in journal:
        raise InstretError(f"{path}: these moves were undone; run `instret dups` again to plan new ones")
    changed = already = 0
    for m in journal["moves"] if forward else reversed(journal["moves"]):
        src, dst = Path(m["from"]), Path(m["to"])
        here, there = (src, dst) if forward else (dst, src)
        state = _state(src, dst, m["sha256"])
        if state == ("moved" if forward else "source"):
            already += 1
            Path(str(dst) + PARTIAL).unlink(missing_ok=True)  # a copy a killed run left unfinished
            continue
        if state == ("source" if forward else "moved"):
            _transfer(here, there)
        elif state != "both":
            raise InstretError(_conflict(state, src, dst, path))
        os.unlink(here)  # an identical copy is at `there` now
        if not forward:
            _remove_empty_parents(dst.parent, Path(journal["dest"]))
        changed += 1
    return changed, already


def unfinished(dest: Path) -> list[Path]:
    """Journals in dest with moves not done (an interrupted run), leaving out those an undo began."""
    out = []
    for path in sorted(dest.glob(JOURNAL_GLOB)) if dest.is_dir() else []:
        journal = read_journal(path)
        if "undo" not in journal and any(
            _state(Path(m["from"]), Path(m["to"]), m["sha256"]) != "moved" for m in journal["moves"]
        ):
            out.append(path)
    return out


def link_groups(groups: list[dict], dest: Path) -> int:
    """Symbolic links for review: dest/group-0001/keep--NAME and dest/group-0001/NN--NAME.
    Nothing else is touched. Returns the number of links made."""
    made = 0
    for n, g in enumerate(groups, 1):
        folder = dest / f"group-{n:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i, m in enumerate(g["members"]):
            prefix = "keep" if m["path"] == g["keep"] else f"{i:02d}"
            link = folder / f"{prefix}--{Path(m['path']).name}"
            if not os.path.lexists(link):
                os.symlink(os.path.abspath(m["path"]), link)
                made += 1
    return made


def _state(src: Path, dst: Path, sha256: str) -> str:
    """source (not moved), moved, both (the same bytes in both places: a move cut short),
    conflict (both, different bytes) or lost (neither)."""
    at_src, at_dst = os.path.lexists(src), os.path.lexists(dst)
    if at_src and not at_dst:
        return "source"
    if at_dst and not at_src:
        return "moved"
    if not at_src:
        return "lost"
    if os.path.samefile(src, dst) or file_sha256(dst) == file_sha256(src) == sha256:
        return "both"
    return "conflict"


def _conflict(state: str, src: Path, dst: Path, journal) -> str:
    if state == "lost":
        return f"{src}: neither it nor {dst} exists; {journal} cannot restore it"
    return f"{dst} exists and differs from {src}; left both alone (journal {journal})"


def _transfer(src: Path, dst: Path) -> None:
    """Make dst a copy of src (a hard link where possible), never replacing an existing file."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
        return
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EMLINK):
            raise
    partial = dst.with_name(dst.name + PARTIAL)
    shutil.copy2(src, partial)
    with open(partial, "rb") as f:
        os.fsync(f.fileno())
    os.link(partial, dst)  # fails rather than replace a file that appeared meanwhile
    os.unlink(partial)


def _remove_empty_parents(folder: Path, stop: Path) -> None:
    while folder != stop and stop in folder.parents:
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent
