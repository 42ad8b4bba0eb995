"""`instret train --nproc-per-node N`: the same training in N local processes, through
torch.distributed's elastic launcher (what `torchrun --standalone --nproc-per-node N` does),
with its failure report folded into one line."""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import uuid
from datetime import datetime
from pathlib import Path

from instret.errors import InstretError
from instret.invocation import PROGRAM_VARIABLE, program
from instret.process_rank import world_size


def launch_local(options: dict, resume: bool, nproc: int) -> int:
    """Run `instret train` in nproc processes with these options; returns the exit status."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if world_size() > 1:
        raise InstretError("--nproc-per-node inside a torchrun job: give the process count to torchrun only")
    options = dict(options)
    if options.get("out") is None and not resume:  # chosen once here: every process writes to one folder
        options["out"] = str(Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S"))
    # One thread per process unless the user chose otherwise: N processes share the cores.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    # Started as `python -m instret`, they name commands as the user typed this one.
    os.environ[PROGRAM_VARIABLE] = program()
    # The processes speak for themselves (rank 0 reports errors); the agent's own log is noise.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
    )
    with tempfile.TemporaryDirectory(prefix="instret-launch-") as tmp:
        path = Path(tmp) / "options.json"
        path.write_text(json.dumps(options))
        args = ["-m", "instret", "train", "--config", str(path)] + (["--resume"] if resume else [])
        try:
            elastic_launch(config, sys.executable)(*args)
        except ChildFailedError as e:
            rank, failure = e.get_first_failure()
            if failure.exitcode not in (1, 2, 130):  # not a one-line error already printed by the process
                raise InstretError(f"training process {rank} failed (exit {failure.exitcode})") from None
            return failure.exitcode
    return 0
