"""`instret index`, `merge-index`, `query`, `dups`, `eval-retrieval`, `info`, `env`: each calls one library function."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from instret import defaults, locations, report
from instret.cli.options import checked, count_option, index_option, max_pixels_option
from instret.invocation import command_line
from instret.storage import atomic_write_text


def _write_html(path: str, page: str) -> None:
    atomic_write_text(Path(path), page)
    click.echo(f"wrote {path}", err=True)


@click.command("index")
@click.argument("images_dir", callback=checked(locations.image_folder))
@click.option(
    "--model",
    required=True,
    callback=checked(locations.encoder_file),
    help="encoder.pt, a run folder holding one, or an index folder (the encoder it was built with).",
)
@click.option(
    "--out",
    required=True,
    callback=checked(locations.index_output),
    help="Index folder (created, or updated incrementally); a run folder means its own, RUN_DIR/index.",
)
@click.option(
    "--index-type",
    default=None,
    help=f"FAISS factory string, e.g. Flat, IVF256,Flat, HNSW32, IVF256,PQ16 [{defaults.INDEX_TYPE}; an update "
    "keeps the index's].",
)
@count_option("--batch-size", default=defaults.INDEX_BATCH, help="Images per decoded batch.")
@click.option("--workers", default=defaults.INDEX_WORKERS, show_default=True, type=click.IntRange(0))
@click.option("--device", default=defaults.INDEX_DEVICE, show_default=True)
@click.option("--rebuild", is_flag=True, help="Re-encode everything (e.g. with a new encoder).")
@max_pixels_option
@click.option("--shard", help="I/N: index only shard I of N (every N-th file); join them with merge-index.")
@click.option(
    "--whiten/--no-whiten",
    default=None,
    help="Search through whitening fitted on the collection (from 256 images) [off; an update keeps "
    "the index's choice].",
)
@click.option(
    "--ray",
    "ray_address",
    is_flag=False,
    flag_value="local",
    default=None,
    metavar="[ADDRESS]",
    help="Encode on Ray (installed with instret's ray extra): a pool of encoder actors, one per GPU (else per "
    "core); without ADDRESS a Ray started on this machine, else a running cluster's head (HOST:6379).",
)
def index_cmd(index_type, max_image_pixels, shard, ray_address, **options):
    """Build or update the search index of a folder of images."""
    from instret.indexer import build_index
    from instret.shards import parse_shard

    summary = build_index(
        factory=index_type,
        max_pixels=max_image_pixels,
        shard=parse_shard(shard) if shard else None,
        ray=ray_address,
        **options,
    )
    click.echo(json.dumps(summary))


@click.command("merge-index")
@click.argument("shard_dirs", nargs=-1, required=True, callback=checked(locations.index_folder))
@click.option(
    "--out", required=True, callback=checked(locations.index_output), help="Index folder to create or update."
)
@click.option(
    "--index-type",
    default=None,
    help="FAISS factory string [the shards']; an IVF layout (IVF4096,Flat, IVF4096,PQ32, ...) is filled shard by "
    "shard with its inverted lists on disk, so the merge never holds every vector in memory.",
)
def merge_index_cmd(shard_dirs, out, index_type):
    """Join the shard indexes of one folder (built with index --shard I/N) into one index."""
    from instret.shards import merge_shards

    click.echo(json.dumps(merge_shards(shard_dirs, out, index_type)))


@click.command("query")
@click.argument("images", nargs=-1, required=True, callback=checked(locations.existing))
@index_option
@count_option("-k", default=defaults.QUERY_K, help="Results per query (all when the index holds fewer).")
@click.option("--min-score", type=float, help="Drop results below this cosine similarity.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per query on stdout.")
@click.option("--html", "html_file", help="Also write a self-contained HTML page of thumbnails.")
@click.option("--grid", "grid_file", help="Also write a PNG: each query, then its neighbours with scores.")
@click.option("--exclude-self", is_flag=True, help="Leave out the query image itself.")
@click.option("--model", help="Refuse unless the index was built with this encoder.")
@click.option("--device", default=defaults.QUERY_DEVICE, show_default=True)
@max_pixels_option
@click.option("--nprobe", type=click.IntRange(1), help=f"IVF layouts: lists visited per query [{defaults.NPROBE}].")
@click.option(
    "--ef-search", type=click.IntRange(1), help=f"HNSW layouts: candidate list length [{defaults.EF_SEARCH}]."
)
@click.option(
    "--existing-only",
    is_flag=True,
    help="Leave out results whose file is gone since it was indexed (otherwise marked missing).",
)
def query_cmd(
    images,
    index_dir,
    k,
    min_score,
    as_json,
    html_file,
    grid_file,
    exclude_self,
    model,
    device,
    max_image_pixels,
    nprobe,
    ef_search,
    existing_only,
):
    """Find the indexed images most similar to each IMAGE (a file, or a folder: each image in it), best first."""
    from instret.searcher import query

    results = query(
        index_dir, images, k, min_score, exclude_self, model, device, max_image_pixels, nprobe, ef_search, existing_only
    )
    click.echo(report.json_lines(results) if as_json else report.query_text(results, len(results) > 1))
    _say_missing([h["path"] for r in results for h in r["results"] if h["missing"]], index_dir)
    if html_file:
        _write_html(html_file, report.query_html(results))
    if grid_file:
        from instret.plots import query_grid, save_figure

        click.echo(f"wrote {save_figure(query_grid(results), grid_file)}", err=True)


KEEP_CHOICES = [
    "largest",
    "oldest",
    "newest",
    "path",
]  # instret.duplicates.KEEP_RULES (not imported: --help stays light)


# What `dups` shows on a terminal while it works (instret.duplicates' stages).
DUPS_STAGES = {"search": "dups: searching the index for similar pairs", "verify": "dups: aligning likely pairs"}


@click.command("dups")
@click.argument("index_dir", required=False, callback=checked(locations.index_folder))
@click.option(
    "--precision",
    default=defaults.DUPS_PRECISION,
    show_default=True,
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    help="Wanted share of true copies among the pairs reported; the threshold is calibrated on the index.",
)
@click.option("--threshold", type=float, help="A raw cosine similarity instead of --precision.")
@click.option(
    "--verify/--no-verify",
    default=True,
    show_default=True,
    help="Check each likely pair by aligning the two images, above the calibrated threshold and below it "
    "(not with --threshold).",
)
@click.option(
    "--keep",
    type=click.Choice(KEEP_CHOICES),
    default=defaults.DUPS_KEEP,
    show_default=True,
    help="The member each group keeps: largest (most pixels, then oldest, then path), oldest, newest, path.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout: the threshold, why, and every group.")
@click.option(
    "--html",
    "html_file",
    metavar="FILE",
    help="Also write a self-contained HTML page: each group side by side, sizes and dates.",
)
@click.option(
    "--move-to",
    "move_to",
    metavar="DIR",
    help="Move every member but the kept one into this folder (keeping its path under "
    "the indexed folder), writing a journal first.",
)
@click.option(
    "--link-to",
    "link_to",
    metavar="DIR",
    help="Make symbolic links of each group in this folder for review; nothing moves.",
)
@click.option(
    "--undo",
    "undo_journal",
    metavar="JOURNAL",
    help="Put back every file a --move-to journal moved (no INDEX_DIR needed).",
)
@click.option(
    "--existing-only",
    is_flag=True,
    help="Leave out members whose file is gone since it was indexed (otherwise marked missing; never kept or moved).",
)
def dups_cmd(
    index_dir, precision, threshold, verify, keep, as_json, html_file, move_to, link_to, undo_journal, existing_only
):
    """Groups of duplicate images in an index: byte copies (exact), then edited copies (near).

    In a group every two members are within the threshold of each other, so groups never chain
    unrelated images through a third. The default lists only; nothing is ever deleted."""
    from instret import moves

    if undo_journal:
        if index_dir or move_to or link_to:
            raise click.UsageError("--undo JOURNAL takes no INDEX_DIR, --move-to or --link-to")
        counts = moves.undo(undo_journal)
        click.echo(f"restored {counts['restored']} file(s); {counts['already_in_place']} already in place", err=True)
        return
    if not index_dir:
        raise click.UsageError("give INDEX_DIR (or --undo JOURNAL)")
    if move_to and link_to:
        raise click.UsageError("give --move-to or --link-to, not both")
    from instret.duplicates import find_duplicates
    from instret.progress import StagedProgress

    progress = StagedProgress(DUPS_STAGES, "pairs")
    try:
        found = find_duplicates(index_dir, threshold, precision, keep, existing_only, move_to, verify, progress)
    finally:
        progress.close()
    groups = found["groups"]
    text = json.dumps(found) if as_json else report.dups_text(groups)
    if text:
        click.echo(text)
    _say_missing([m["path"] for g in groups for m in g["members"] if m["missing"]], index_dir)
    exact = sum(g["tier"] == "exact" for g in groups)
    click.echo(
        f"{len(groups)} group(s): {exact} exact, {len(groups) - exact} near, at similarity >= "
        f"{found['threshold']:.4f} ({found['reason']})",
        err=True,
    )
    if html_file:
        _write_html(html_file, report.dups_html(groups))
    if link_to:
        made = moves.link_groups(groups, Path(link_to))
        click.echo(f"made {made} link(s) in {link_to}", err=True)
    if move_to:
        _say_moves(found["moves"], move_to)


def _say_missing(paths: list[str], index_dir: str) -> None:
    """A line on stderr when results are files gone since indexing, with the update command."""
    if not paths:
        return
    from instret.index import SearchIndex

    index = SearchIndex(index_dir)
    root = index.manifest["root"]
    index.close()
    # --model INDEX: the encoder the index was built with, so the update re-encodes nothing.
    click.echo(
        report.missing_note(paths, command_line("index", root, "--model", index_dir, "--out", index_dir)), err=True
    )


def _say_moves(done: dict, dest: str) -> None:
    """What find_duplicates(move_to=...) did, on stderr."""
    for finished in done["finished"]:
        click.echo(
            f"finished the interrupted move of {finished['journal']}: {finished['moved']} more file(s)", err=True
        )
    for note in done["notes"]:
        click.echo(note, err=True)
    if done["journal"] is None:
        click.echo("nothing to move", err=True)
        return
    undo = command_line("dups", "--undo", done["journal"])
    click.echo(f"moved {done['moved']} file(s) to {os.path.abspath(dest)}; undo with: {undo}", err=True)


@click.command("eval-retrieval")
@click.argument("images_dir", callback=checked(locations.image_folder))
@click.option(
    "--model", callback=checked(locations.encoder_file), help="Encoder to index the folder with (a temporary index)."
)
@click.option(
    "--index", "index_dir", callback=checked(locations.index_folder), help="An existing index of this folder."
)
@click.option("--json", "as_json", is_flag=True)
@click.option("--workers", default=defaults.INDEX_WORKERS, show_default=True, type=click.IntRange(0))
@click.option("--device", default=defaults.INDEX_DEVICE, show_default=True)
@max_pixels_option
def eval_retrieval_cmd(images_dir, model, index_dir, as_json, workers, device, max_image_pixels):
    """Each image queries all others; a hit shares its sub-folder. Prints mAP, recall@k, precision@10."""
    from instret.searcher import eval_retrieval

    metrics = eval_retrieval(images_dir, model, index_dir, workers, device, max_image_pixels)
    if as_json:
        click.echo(json.dumps(metrics))
    else:
        click.echo("\n".join(f"{k}\t{v}" for k, v in metrics.items()))


@click.command("info")
@click.argument("index_dir", callback=checked(locations.index_folder))
@click.option("--json", "as_json", is_flag=True)
def info_cmd(index_dir, as_json):
    """What an index holds: vectors, dimension, type, encoder, sizes on disk, skipped files."""
    from instret.info import index_info
    from instret.report import one_line

    info = index_info(index_dir)
    if as_json:
        click.echo(json.dumps(info))
        return
    for key, value in info.items():
        if key == "skipped_files":
            for f in value:
                click.echo(f"  skipped\t{one_line(f['path'])}\t{f['reason']}")
        elif key == "bytes":
            for name, size in value.items():
                click.echo(f"  {name}\t{size}")
        else:
            click.echo(f"{key}\t{value}")


@click.command("env")
@click.option("--json", "as_json", is_flag=True)
def env_cmd(as_json):
    """Versions of Python, torch, torchvision, faiss, and whether each sees a GPU."""
    from instret.env import environment

    env = environment()
    click.echo(json.dumps(env) if as_json else "\n".join(f"{k}\t{v}" for k, v in env.items()))


COMMANDS = [index_cmd, merge_index_cmd, query_cmd, dups_cmd, eval_retrieval_cmd, info_cmd, env_cmd]
