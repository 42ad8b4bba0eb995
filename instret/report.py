"""Showing results: tab-separated text, JSON lines, and one self-contained HTML page."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path


def one_line(path: str) -> str:
    """A path for line-based text output: control characters (a newline or tab in a file name)
    as backslash escapes, so that one hit stays one line. JSON output keeps the exact name."""
    return "".join(c.encode("unicode_escape").decode("ascii") if ord(c) < 32 or ord(c) == 127 else c for c in path)


def query_text(results: list[dict], show_query: bool) -> str:
    lines = []
    for r in results:
        if show_query:
            lines.append(f"# {one_line(r['query'])}")
        lines += [f"{h['rank']}\t{h['score']:.4f}\t{one_line(h['path'])}" for h in r["results"]]
    return "\n".join(lines)


def json_lines(objects) -> str:
    # ASCII escapes keep every path valid JSON, even names whose bytes are not UTF-8.
    return "\n".join(json.dumps(o) for o in objects)


def dups_text(groups: list[dict]) -> str:
    """A block per group: a header, then `keep|dup|missing<TAB>score<TAB>WxH<TAB>path` per member
    (missing: the file is gone since it was indexed)."""
    blocks = []
    for n, g in enumerate(groups, 1):
        lines = [f"# group {n}: {g['tier']}, {len(g['members'])} files, min score {g['min_score']:.4f}"]
        lines += [
            f"{_role(m, g)}\t{m['score']:.4f}\t{m['width']}x{m['height']}\t{one_line(m['path'])}" for m in g["members"]
        ]
        blocks.append("\n".join(lines))
    return "\n".join(blocks)


def _role(member: dict, group: dict) -> str:
    if member.get("missing"):
        return "missing"
    return "keep" if member["path"] == group["keep"] else "dup"


def missing_note(paths: list[str], update: str) -> str | None:
    """The stderr line when results name files gone since they were indexed, with the command
    that brings the index up to date; None when every file is there."""
    if not paths:
        return None
    example = one_line(paths[0]) + (f" and {len(paths) - 1} more" if len(paths) > 1 else "")
    return (
        f"note: gone since indexing: {len(paths)} of the files shown ({example}); "
        f"--existing-only leaves them out; update the index: {update}"
    )


def thumbnail_uri(path: str, size: int = 128) -> str | None:
    """A data: URI of a small JPEG of the image, or None if it cannot be read."""
    from instret.images import thumbnail  # imports torch: text and JSON output start without it

    img = thumbnail(path, size)
    if img is None:
        return None
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(path: str, caption: str, missing: bool = False) -> str:
    """A thumbnail and its caption; a file gone since it was indexed is a struck-out tile."""
    uri = None if missing else thumbnail_uri(path)
    if missing:
        img, caption, kind = '<div class="blank gone">file missing</div>', "missing: " + caption, ' class="gone"'
    else:
        img, kind = (f'<img src="{uri}" alt="">' if uri else '<div class="blank">unreadable</div>'), ""
    if uri:  # a click opens the image itself
        img = f'<a href="{html.escape(Path(path).resolve().as_uri(), quote=True)}">{img}</a>'
    return (
        f'<figure{kind} title="{html.escape(path, quote=True)}">{img}'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 1em; }}
.row {{ display: flex; flex-wrap: wrap; gap: 6px; align-items: flex-start; margin-bottom: 1.5em; }}
figure {{ margin: 0; width: 132px; }} img {{ max-width: 128px; max-height: 128px; }}
figcaption {{ font-size: 11px; word-break: break-all; }}
.query {{ border-right: 3px solid #c33; padding-right: 6px; }}
.blank {{ width: 128px; height: 64px; background: #eee; }}
.gone .blank {{ background: linear-gradient(to top right, #eee 48%, #c33 49%, #c33 51%, #eee 52%); color: #c33; }}
.gone figcaption {{ text-decoration: line-through; color: #c33; }}
</style></head><body><h1>{title}</h1>
{body}
</body></html>
"""


def _meaning(hit: dict) -> str:
    """How unusual the score is for this index, in words (instret.calibration)."""
    if "unrelated_above" not in hit:
        return ""
    text = f" (unrelated pairs this high: {hit['unrelated_above']:.2%}"
    if "copies_below" in hit:
        text += f"; edited copies lower: {hit['copies_below']:.0%}"
    return text + ")"


def query_html(results: list[dict]) -> str:
    rows = []
    for r in results:
        cells = [f'<div class="query">{_figure(r["query"], "query: " + r["query"])}</div>']
        cells += [
            _figure(h["path"], f"#{h['rank']} {h['score']:.4f}{_meaning(h)} {h['path']}", h.get("missing", False))
            for h in r["results"]
        ]
        rows.append(f'<div class="row">{"".join(cells)}</div>')
    return PAGE.format(title="instret query results", body="\n".join(rows))


def dups_html(groups: list[dict]) -> str:
    """One section per group (with an anchor, #group-N): its members side by side, the kept one
    first, each with its score, pixel size, file size, date and what confirmed it."""
    sections = []
    for n, g in enumerate(groups, 1):
        head = (
            f'<h2 id="group-{n}">group {n}: {g["tier"]}, {len(g["members"])} files, min score {g["min_score"]:.4f}</h2>'
        )
        cells = []
        for m in g["members"]:
            role = "keep" if m["path"] == g["keep"] else ("identical bytes" if m["identical"] else f"{m['score']:.4f}")
            caption = (
                f"{role} · {m['width']}x{m['height']} · {m['bytes'] / 1024:.0f} KB · {m['modified'][:10]} · {m['path']}"
            )
            if m.get("confirmed"):  # what makes it a copy of the kept one
                caption += f" · {m['confirmed']['reason']}"
            cells.append(_figure(m["path"], caption, m.get("missing", False)))
        sections.append(head + '<div class="row">' + "".join(cells) + "</div>")
    return PAGE.format(title="instret duplicates", body="\n".join(sections))
