"""Options several commands share."""

from __future__ import annotations

import click

from instret import defaults, locations


def checked(check):
    """A click callback that passes each given value through one of instret.locations' checks
    (which import neither torch nor FAISS), so that a wrong path is refused before seconds of
    imports; the value goes on as typed."""

    def callback(ctx, param, value):
        for v in value if isinstance(value, tuple) else [value]:
            if v is not None:
                check(v)
        return value

    return callback


max_pixels_option = click.option(
    "--max-image-pixels",
    type=click.IntRange(0),
    help=f"Refuse image files with more pixels (decompression bombs); 0: no limit [{defaults.MAX_IMAGE_PIXELS}, Pillow's].",
)

index_option = click.option(
    "--index",
    "index_dir",
    required=True,
    callback=checked(locations.index_folder),
    help="Index folder, or a run folder of `train --data`.",
)


def count_option(*declarations: str, default: int, help: str):
    """An option counting something, at least 1, with its default shown in --help."""
    return click.option(*declarations, default=default, show_default=True, type=click.IntRange(1), help=help)
