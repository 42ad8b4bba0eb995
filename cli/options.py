"""Options several commands share."""

from __future__ import annotations

import click

max_pixels_option = click.option(
    "--max-image-pixels",
    type=click.IntRange(0),
    help="Refuse image files with more pixels (decompression bombs); 0: no limit [89478485, Pillow's].",
)

index_option = click.option(
    "--index", "index_dir", required=True, help="Index folder, or a run folder of `train --data`."
)
