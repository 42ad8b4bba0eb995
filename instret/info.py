"""What an index holds (`instret info`)."""

from __future__ import annotations

from pathlib import Path

from instret.index import SearchIndex


def index_info(index_dir: str | Path | SearchIndex) -> dict:
    """What the index (a folder, or one opened already) holds, as `instret info --json` prints it."""
    index = index_dir if isinstance(index_dir, SearchIndex) else SearchIndex(index_dir)
    m = index.manifest
    sizes = {p.name: p.stat().st_size for p in sorted(index.gen_dir.iterdir()) if p.is_file()}
    total = sum(p.stat().st_size for p in index.dir.rglob("*") if p.is_file())
    skipped = index.skipped()
    return {
        "index": str(index.dir),
        "generation": index.generation,
        "vectors": m["count"],
        "dim": m["dim"],
        "metric": m.get("metric"),
        "index_type": m["factory"],
        "encoder_fingerprint": m["encoder_fingerprint"],
        "encoder_arch": m.get("encoder_arch"),
        "image_size": m.get("image_size"),
        "root": m["root"],
        "updated": m.get("updated"),
        "skipped": len(skipped),
        "skipped_files": [{"path": p, "reason": r} for p, r in skipped],
        "bytes": sizes,
        "bytes_total": total,
    }
