"""`instret serve`: the search page and JSON API over one index (instret.serve)."""

from __future__ import annotations

import click

from instret import defaults
from instret.cli.options import count_option, index_option, max_pixels_option


@click.command("serve")
@index_option
@click.option(
    "--host",
    default=defaults.SERVE_HOST,
    show_default=True,
    help="Address to listen on; another than loopback lets others reach the index and its images.",
)
@click.option(
    "--port", default=defaults.SERVE_PORT, show_default=True, type=click.IntRange(0, 65535), help="0: any free port."
)
@count_option(
    "--workers", default=defaults.SERVE_WORKERS, help="Server processes, each holding the encoder and the index."
)
@click.option(
    "--max-upload-mb",
    default=defaults.SERVE_MAX_UPLOAD_MB,
    show_default=True,
    type=click.FloatRange(0, min_open=True),
    help="Largest request body accepted, checked before it is read.",
)
@max_pixels_option
@click.option("--device", default=defaults.QUERY_DEVICE, show_default=True, help="Where queries are encoded.")
@click.option(
    "--nprobe",
    type=click.IntRange(1),
    help=f"IVF layouts: lists visited per query [{defaults.NPROBE}]; a request may ask.",
)
def serve_cmd(index_dir, host, port, workers, max_upload_mb, max_image_pixels, device, nprobe):
    """Serve a search page and a JSON API (/api/v1/...) over an index, with the encoder kept warm.

    A new generation written by `instret index` is picked up between requests, without a restart."""
    from instret.serve import serve

    serve(index_dir, host, port, workers, max_upload_mb, max_image_pixels, device, nprobe)


COMMANDS = [serve_cmd]
