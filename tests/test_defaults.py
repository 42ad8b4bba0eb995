"""Every default a command shows in its --help is the value that runs: the library function the
command calls has that default, or (where the option passes None) decides that value itself."""

from __future__ import annotations

import inspect
import re

import click
import pytest

from instret import defaults
from instret.cli.main import cli
from instret.config import TrainConfig, default_text

# The library function each command hands its options to, and the options named otherwise there.
CALLS = {
    "index": ("instret.indexer", "build_index", {"index_type": "factory", "max_image_pixels": "max_pixels"}),
    "query": ("instret.searcher", "query", {"max_image_pixels": "max_pixels"}),
    "dups": ("instret.duplicates", "find_duplicates", {}),
    "eval-retrieval": ("instret.searcher", "eval_retrieval", {"max_image_pixels": "max_pixels"}),
    "serve": ("instret.serve", "serve", {"max_image_pixels": "max_pixels"}),
}


def decided_later() -> dict:
    """Options that pass None, with the value the library then uses (read where it is used)."""
    from instret import faiss_boundary, images, indexer, postprocess

    return {
        "whiten": "on" if postprocess.WHITEN_BY_DEFAULT else "off",
        "index_type": indexer.INDEX_TYPE,
        "nprobe": faiss_boundary.NPROBE,
        "ef_search": faiss_boundary.EF_SEARCH,
        "max_image_pixels": images.MAX_IMAGE_PIXELS,
    }


def shown_default(command: click.Command, option: click.Option) -> str | None:
    """The default an option's --help line shows: click's "[default: X; ...]", or else the last
    "[X]" written by hand (up to a ";" or ","); None when it shows none. Click's "[required]" and
    ranges ("x>=0") are not defaults."""
    with click.Context(command, info_name=command.name) as ctx:
        record = option.get_help_record(ctx)
    text = " ".join((record[1] if record else "").split())
    hand = None
    for group in re.findall(r"\[([^\]]+)\]", text):
        parts = group.split("; ")
        for part in parts:
            if part.startswith("default: "):
                return part.removeprefix("default: ")
        if parts[0] != "required" and not re.fullmatch(r"[-\d.]*x[<>=]+.*|.*[<>]=?x", parts[0]):
            hand = parts[0].split(",")[0]
    return hand


def options(name: str) -> list[click.Option]:
    return [p for p in cli.commands[name].params if isinstance(p, click.Option) and p.name != "help"]


def given(command: click.Command, option: click.Option):
    """What the command's function receives when the option is not given (None for nothing)."""
    with click.Context(command, info_name=command.name) as ctx:
        value = option.get_default(ctx)
    return None if repr(value) == "Sentinel.UNSET" else value


def has_default(command: click.Command, option: click.Option) -> bool:
    """A value the option hands on when it is not given (a flag's False is no value)."""
    return given(command, option) not in (None, False, ())


def as_shown(value) -> str:
    return str(value)


@pytest.mark.parametrize("name", sorted(CALLS))
def test_each_default_a_search_command_shows_is_the_librarys(name):
    import importlib

    module, function, renamed = CALLS[name]
    signature = inspect.signature(getattr(importlib.import_module(module), function)).parameters
    later = decided_later()
    checked = 0
    for option in options(name):
        shown = shown_default(cli.commands[name], option)
        param = signature.get(renamed.get(option.name, option.name))
        library = param.default if param is not None else inspect.Parameter.empty
        if library not in (inspect.Parameter.empty, None):
            # The option hands its own default to a parameter that has one: the two must agree,
            # and --help must show it.
            assert given(cli.commands[name], option) == library, (name, option.name)
            if option.is_flag and isinstance(library, bool):  # click names the side that is on
                names = option.opts if library else option.secondary_opts
                assert shown in (None, *(n.lstrip("-") for n in names)), (name, option.name, shown)
                assert library is False or shown is not None, (name, option.name)
            else:
                assert shown == as_shown(library), (name, option.name, shown)
            checked += 1
        elif shown is not None:
            assert option.name in later, f"{name} --{option.name} shows [{shown}]: where does that value run?"
            assert given(cli.commands[name], option) is None, (name, option.name)
            assert shown == as_shown(later[option.name]), (name, option.name, shown)
            checked += 1
        else:
            # No default shown: the option must not have one that runs unseen.
            assert not has_default(cli.commands[name], option), (name, option.name)
    assert checked >= 2


def test_the_defaults_the_library_reads_are_the_shared_ones():
    later = decided_later()
    del later["whiten"]  # the index's own choice, not a shared value
    assert later == {
        "index_type": defaults.INDEX_TYPE,
        "nprobe": defaults.NPROBE,
        "ef_search": defaults.EF_SEARCH,
        "max_image_pixels": defaults.MAX_IMAGE_PIXELS,
    }


# train's options pass None unless given; TrainConfig (with the presets) decides. These are
# written by hand in the help, for a value that depends on the machine or the data.
TRAIN_BY_HAND = {
    "out": "runs/<timestamp>",
    "image_size": str(defaults.IMAGE_SIZE),  # and PHOTO_IMAGE_SIZE for photos on a GPU (instret.data)
    "stream": "when it would take over a quarter of the memory",
    "amp": "on a GPU with bf16",
    "fused_optimizer": "on on a GPU",
    "nproc_per_node": "1",
    "recipe": "paper",  # or short for a --data run given a --time-budget (tests/test_train.py)
}


def test_each_default_train_shows_is_the_configurations():
    config, later = TrainConfig(), decided_later()
    for option in options("train"):
        shown = shown_default(cli.commands["train"], option)
        if option.name in TRAIN_BY_HAND:
            assert shown == TRAIN_BY_HAND[option.name], (option.name, shown)
        elif option.name in later:
            assert shown == as_shown(later[option.name]), (option.name, shown)
        elif option.name in ("compile", "channels_last"):
            assert shown == ("on" if getattr(config, option.name) else "off"), option.name
        elif hasattr(config, option.name) and shown is not None:
            # default_text(field) is what the help says; the help must show exactly that.
            assert shown == default_text(option.name).split(";")[0].split(",")[0], option.name
        else:
            assert not has_default(cli.commands["train"], option), option.name
    assert TrainConfig().compile is False and TrainConfig().channels_last is True


def test_the_launcher_option_starts_one_process_by_default():
    (option,) = [o for o in options("train") if o.name == "nproc_per_node"]
    assert option.default == 1
