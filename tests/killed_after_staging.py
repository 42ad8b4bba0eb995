"""`instret` that kills itself, and the processes it started, with SIGKILL just after its N-th
batch is committed to staging: a driver lost midway, for the resume tests.

    INSTRET_KILL_AFTER_BATCHES=N python tests/killed_after_staging.py ARGS...

Start it in a session of its own (its process group is what dies).
"""

import os
import signal
import sys

from instret import metadata

after = int(os.environ["INSTRET_KILL_AFTER_BATCHES"])
committed = 0
real_add = metadata.Staging.add


def add(self, rows):
    global committed
    real_add(self, rows)
    committed += 1
    if committed == after:
        os.killpg(os.getpgid(0), signal.SIGKILL)


metadata.Staging.add = add

from instret.cli.main import main  # noqa: E402  (after the patch)

main(sys.argv[1:])
