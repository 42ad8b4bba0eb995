"""The `instret` command group and its error handling: one line on stderr, non-zero exit."""

from __future__ import annotations

import os
import sqlite3
import sys

import click

from instret.errors import InstretError
from instret.process_rank import rank as process_rank


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="instret")
def cli() -> None:
    """Unsupervised instance discrimination and instance-level image search."""


def _register() -> None:
    from instret.cli import search, serve, train

    for command in [*train.COMMANDS, *search.COMMANDS, *serve.COMMANDS]:
        cli.add_command(command)


_register()


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors become `instret: error: ...` with exit status 1 (2 for usage)."""
    for stream in (sys.stdout, sys.stderr):
        # File names with bytes that are not UTF-8 are printed as those bytes, not a traceback.
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="surrogateescape")
    try:
        cli.main(args=argv, prog_name="instret", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.UsageError as e:
        _fail(e.format_message(), 2)
    except click.ClickException as e:
        _fail(e.format_message(), e.exit_code)
    except InstretError as e:
        _fail(str(e), 1)
    except (KeyboardInterrupt, click.exceptions.Abort):
        _fail(_interrupted(sys.argv[1:] if argv is None else argv), 130)
    except BrokenPipeError:
        sys.exit(0)
    except OSError as e:  # a full disk, a read-only folder, a vanished file: what and where, no traceback
        where = f"{e.filename}: " if e.filename else ""
        _fail(f"{where}{e.strerror or e}; nothing finished was lost", 1, every_rank=True)
    except sqlite3.Error as e:
        _fail(f"index database: {e}; nothing finished was lost", 1, every_rank=True)
    except Exception as e:
        if os.environ.get("INSTRET_DEBUG"):
            raise
        _fail(f"unexpected {type(e).__name__}: {e} (INSTRET_DEBUG=1 shows the traceback)", 1, every_rank=True)


# What an interrupt leaves, by command: what was saved and how to go on.
INTERRUPTED = {
    "train": "the last finished epoch is saved in the run folder: rerun the same command with --resume "
    "(and --out RUN_DIR, the run folder named when it started) to continue from it",
    "index": "every batch encoded so far is staged: rerun the same command to continue from it",
    "merge-index": "the index is as it was: rerun the same command",
    "dups": "no file was moved (a --move-to under way says what it did; links --link-to made stay)",
    "export": "nothing was written (the file appears whole or not at all)",
}


def _interrupted(args: list[str]) -> str:
    command = next((a for a in args if not a.startswith("-")), None)
    if command not in cli.commands:
        return "interrupted"
    return f"{command} interrupted; {INTERRUPTED.get(command, 'nothing was written')}"


def _fail(message: str, code: int, every_rank: bool = False) -> None:
    """Print `instret: error: ...` and exit. Under torchrun every process meets the same user
    error, so rank 0 alone tells it; a fault of one process (every_rank) is told with its rank."""
    rank = process_rank()
    one_line = " ".join(str(message).split())
    if rank == 0 or every_rank:
        print(f"instret: error: {f'[rank {rank}] ' if rank else ''}{one_line}", file=sys.stderr)
    sys.exit(code)
