"""`instret train --nproc-per-node N`: the same training in N local processes, through
torch.distributed's launcher (what `torchrun --standalone --nproc-per-node N` does)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path

from instret.errors import InstretError


def launch_local(options: dict, resume: bool, nproc: int) -> int:
    """Run `instret train` in nproc processes with these options; returns the exit status."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise InstretError("--nproc-per-node inside a torchrun job: give the process count to torchrun only")
    options = dict(options)
    if options.get("out") is None and not resume:  # chosen once here: every process writes to one folder
        options["out"] = str(Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S"))
    with tempfile.TemporaryDirectory(prefix="instret-launch-") as tmp:
        config = Path(tmp) / "options.json"
        config.write_text(json.dumps(options))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "instret", "train", "--config", str(config)] + (["--resume"] if resume else [])  # fmt: skip
        # One thread per process unless the user chose otherwise: N processes share the cores.
        env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc)), **os.environ}
        return subprocess.run(cmd, env=env).returncode
