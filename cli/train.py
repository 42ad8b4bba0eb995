"""`instret train` (options -> a dict of the ones given -> instret.run.train), and the
commands that read a run folder: `plot`, `export`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from instret import defaults, locations
from instret.cli.options import checked, max_pixels_option
from instret.config import (
    ARCHS,
    BANK_INITS,
    DATASETS,
    LOSSES,
    MULTI_VIEW_MODES,
    NEIGHBOURHOODS,
    RECIPES,
    SCHEDULES,
    default_text,
    multi_view_text,
    read_config_file,
    recipe_text,
)


@click.command()
@click.option(
    "--data",
    type=str,
    callback=checked(lambda path: locations.image_folder(path, "--data")),
    help="Folder of images (class sub-folders give labels; train/ + test/ a split).",
)
@click.option(
    "--dataset",
    type=click.Choice(DATASETS),
    help=f"Built-in dataset when --data is absent [{default_text('dataset')}].",
)
@click.option("--data-root", type=str, help=f"Where --dataset looks for its files [{default_text('data_root')}].")
@click.option("--download", is_flag=True, default=None, help="Allow downloading --dataset cifar10.")
@click.option("--out", type=str, help="Run folder [runs/<timestamp>].")
@click.option("--arch", type=click.Choice(ARCHS), help="Backbone; auto: resnet18 on a GPU, small on CPU.")
@click.option("--epochs", type=int, help=f"Epochs [{default_text('epochs')}].")
@click.option(
    "--time-budget",
    type=float,
    help="Minutes the whole run may take: the epochs (and so the schedule) are planned from the "
    "first timed steps to end in time; --epochs then caps them. With --data, the recipe is then "
    "short unless --recipe says otherwise.",
)
@click.option(
    "--recipe",
    type=click.Choice(sorted(RECIPES)),
    help="Training recipe: retrieval (the paper's augmentation plus the edits copies go through, "
    "bank from features), colour (retrieval with gentle colour jitter), short (for CPU runs of "
    f"minutes: {recipe_text('short')}) or paper (the authors') [paper; short for --data with "
    "--time-budget].",
)
@click.option("--batch-size", type=int, help=f"Batch size [{default_text('batch_size')}].")
@click.option("--lr", type=float, help=f"SGD learning rate [{default_text('lr')}].")
@click.option(
    "--lr-schedule",
    type=click.Choice(SCHEDULES),
    help=f"step (x0.1 at 60 % and 80 %) or cosine [{default_text('lr_schedule')}].",
)
@click.option(
    "--loss", type=click.Choice(LOSSES), help=f"Exact softmax over the bank, or NCE [{default_text('loss')}]."
)
@click.option("--nce-k", type=int, help=f"NCE noise samples m [{default_text('nce_k')}].")
@click.option("--tau", type=float, help=f"Temperature, also the kNN sigma [{default_text('tau')}].")
@click.option("--bank-momentum", type=float, help=f"Memory bank momentum [{default_text('bank_momentum')}].")
@click.option(
    "--prox-lambda", type=float, help=f"Weight of the proximal term; 0 turns it off [{default_text('prox_lambda')}]."
)
@click.option(
    "--bank-init",
    type=click.Choice(BANK_INITS),
    help=f"Memory bank start: random (paper) or features [{default_text('bank_init')}].",
)
@click.option(
    "--neighbourhoods",
    type=click.Choice(NEIGHBOURHOODS),
    help="Rounds that mine the memory bank for each image's neighbours and train them as positives: "
    "mutual (mutual nearest neighbours as close as two views of one image), anchors (AND's "
    f"lowest-entropy curriculum) or off [{default_text('neighbourhoods')}; mutual under --recipe short].",
)
@click.option(
    "--neighbour-k", type=int, help=f"Nearest bank rows a neighbourhood is taken from [{default_text('neighbour_k')}]."
)
@click.option(
    "--neighbour-rounds", type=int, help=f"Neighbourhood rounds in a run [{default_text('neighbour_rounds')}]."
)
@click.option(
    "--multi-view",
    type=click.Choice(MULTI_VIEW_MODES),
    help="Train to find one thing across its views: on ("
    + multi_view_text()
    + "), off, or auto (start again with it on when, early in the run, a quarter of the images "
    f"or more have a confident neighbour) [{default_text('multi_view')}].",
)
@click.option("--knn-k", type=int, help=f"Neighbours in the weighted kNN [{default_text('knn_k')}].")
@click.option(
    "--monitor-size",
    type=int,
    help=f"Held-out images the per-epoch kNN embeds; 0: all [{default_text('monitor_size')}].",
)
@click.option("--low-dim", type=int, help=f"Feature dimension [{default_text('low_dim')}].")
@click.option(
    "--image-size",
    type=int,
    help=f"Side of the square training images [{defaults.IMAGE_SIZE}; with --data on a GPU, "
    f"{defaults.PHOTO_IMAGE_SIZE} when a quarter of the images are photos].",
)
@click.option("--device", type=str, help=f"auto, cpu, cuda or cuda:N [{default_text('device')}].")
@click.option("--workers", type=int, help=f"Processes decoding image files [{default_text('workers')}].")
@click.option(
    "--stream/--no-stream",
    default=None,
    help="--data: decode each batch from the files (datasets larger than memory) instead of holding "
    "the decoded set in memory [when it would take over a quarter of the memory].",
)
@click.option("--seed", type=int, help=f"Random seed [{default_text('seed')}].")
@max_pixels_option
@click.option("--amp/--no-amp", default=None, help="bf16 autocast [on a GPU with bf16, and on a CPU with AMX].")
@click.option("--compile/--no-compile", "compile", default=None, help="torch.compile the encoder [off].")
@click.option("--fused-optimizer/--no-fused-optimizer", default=None, help="Fused SGD [on on a GPU].")
@click.option("--channels-last/--no-channels-last", default=None, help="channels_last memory format [on].")
@click.option("--config", "config_file", type=str, help="YAML or JSON file of defaults; flags override it.")
@click.option("--resume", is_flag=True, help="Continue the run folder given by --out from its last epoch.")
@click.option(
    "--nproc-per-node",
    type=click.IntRange(1),
    default=1,
    help="Train with N processes on this machine (torchrun; one per GPU, or CPU processes) [1].",
)
def train(config_file, resume, nproc_per_node, **options) -> None:
    """Learn an image encoder without labels by Instance Discrimination."""
    merged = read_config_file(config_file) if config_file else {}
    merged.update({k: v for k, v in options.items() if v is not None})
    if nproc_per_node > 1:
        from instret.launch import launch_local

        raise SystemExit(launch_local(merged, resume, nproc_per_node))
    from instret.run import train as run_train

    final = run_train(merged, resume=resume)
    if final is not None:  # None: a process other than rank 0 under torchrun
        click.echo(json.dumps(final))


@click.command("plot")
@click.argument("run_dir")
@click.option("--out", "out_file", help="PNG file to write [RUN_DIR/curves.png].")
def plot_cmd(run_dir, out_file):
    """Training curves of a run (loss beside ln n, the label-free monitor, kNN top-1) as a PNG."""
    from instret.plots import save_figure, training_curves

    path = save_figure(training_curves(run_dir), out_file or Path(run_dir) / "curves.png")
    click.echo(f"wrote {path}", err=True)


@click.command("export")
@click.argument("run_dir", callback=checked(locations.encoder_file))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["torchscript", "onnx"]),
    required=True,
    help="TorchScript (torch.jit.load) or ONNX (onnxruntime; needs pip install onnx).",
)
@click.option("--out", "out_file", required=True, help="File to write.")
def export_cmd(run_dir, fmt, out_file):
    """The encoder of RUN_DIR (or an encoder.pt) as one file, its preprocessing in the metadata."""
    from instret.export import export_encoder

    meta = export_encoder(run_dir, fmt, out_file)
    click.echo(json.dumps({"out": out_file, **meta}))


COMMANDS = [train, plot_cmd, export_cmd]
