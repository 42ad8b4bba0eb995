"""`instret train`: options -> a dict of the ones given -> instret.train.train."""

from __future__ import annotations

import json

import click

from instret.cli.options import max_pixels_option
from instret.config import ARCHS, BANK_INITS, DATASETS, LOSSES, RECIPES, SCHEDULES, read_config_file


@click.command()
@click.option("--data", type=str, help="Folder of images (class sub-folders give labels; train/ + test/ a split).")
@click.option("--dataset", type=click.Choice(DATASETS), help="Built-in dataset when --data is absent [digits].")
@click.option("--data-root", type=str, help="Where --dataset looks for its files [data].")
@click.option("--download", is_flag=True, default=None, help="Allow downloading --dataset cifar10.")
@click.option("--out", type=str, help="Run folder [runs/<timestamp>].")
@click.option("--arch", type=click.Choice(ARCHS), help="Backbone; auto: resnet18 on a GPU, small on CPU.")
@click.option("--epochs", type=int, help="Epochs [200; 30 for digits].")
@click.option("--time-budget", type=float,
              help="Minutes the whole run may take: the epochs (and so the schedule) are planned from the "
                   "first timed steps to end in time; --epochs then caps them.")  # fmt: skip
@click.option("--recipe", type=click.Choice(sorted(RECIPES)),
              help="Training recipe: retrieval (the paper's augmentation plus the edits copies go through, "
                   "bank from features), colour (retrieval with gentle colour jitter) or paper (the authors') "
                   "[paper].")  # fmt: skip
@click.option("--batch-size", type=int, help="Batch size [128].")
@click.option("--lr", type=float, help="SGD learning rate [0.03].")
@click.option("--lr-schedule", type=click.Choice(SCHEDULES), help="step (x0.1 at 60 % and 80 %) or cosine [step].")
@click.option("--loss", type=click.Choice(LOSSES), help="Exact softmax over the bank, or NCE [softmax].")
@click.option("--nce-k", type=int, help="NCE noise samples m [4096].")
@click.option("--tau", type=float, help="Temperature, also the kNN sigma [0.1].")
@click.option("--bank-momentum", type=float, help="Memory bank momentum [0.5].")
@click.option("--prox-lambda", type=float, help="Weight of the proximal term; 0 turns it off [0].")
@click.option("--bank-init", type=click.Choice(BANK_INITS), help="Memory bank start: random (paper) or features [random].")
@click.option("--knn-k", type=int, help="Neighbours in the weighted kNN [200].")
@click.option("--monitor-size", type=int, help="Held-out images the per-epoch kNN embeds; 0: all [5000].")
@click.option("--low-dim", type=int, help="Feature dimension [128].")
@click.option("--image-size", type=int, help="Side of the square training images [--data: 64 for photos, 32 for small images; 32 otherwise].")
@click.option("--device", type=str, help="auto, cpu, cuda or cuda:N [auto].")
@click.option("--workers", type=int, help="Processes decoding image files [2].")
@click.option("--stream/--no-stream", default=None,
              help="--data: decode each batch from the files (datasets larger than memory) instead of holding "
                   "the decoded set in memory [when it would take over a quarter of the memory].")  # fmt: skip
@click.option("--seed", type=int, help="Random seed [0].")
@max_pixels_option
@click.option("--amp/--no-amp", default=None, help="bf16 autocast [on where the GPU supports bf16].")
@click.option("--compile/--no-compile", "compile", default=None, help="torch.compile the encoder [off].")
@click.option("--fused-optimizer/--no-fused-optimizer", default=None, help="Fused SGD [on on a GPU].")
@click.option("--channels-last/--no-channels-last", default=None, help="channels_last memory format [on].")
@click.option("--config", "config_file", type=str, help="YAML or JSON file of defaults; flags override it.")
@click.option("--resume", is_flag=True, help="Continue the run folder given by --out from its last epoch.")
@click.option("--nproc-per-node", type=click.IntRange(1), default=1,
              help="Train with N processes on this machine (torchrun; one per GPU, or CPU processes) [1].")  # fmt: skip
def train(config_file, resume, nproc_per_node, **options) -> None:
    """Learn an image encoder without labels by Instance Discrimination."""
    merged = read_config_file(config_file) if config_file else {}
    merged.update({k: v for k, v in options.items() if v is not None})
    if nproc_per_node > 1:
        from instret.launch import launch_local

        raise SystemExit(launch_local(merged, resume, nproc_per_node))
    from instret.train import train as run_train

    final = run_train(merged, resume=resume)
    if final is not None:  # None: a process other than rank 0 under torchrun
        click.echo(json.dumps(final))
