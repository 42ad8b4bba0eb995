"""`instret` that kills itself with SIGKILL at one atomic rename, for the interruption tests.

    INSTRET_KILL_AT=NAME:N:WHEN python tests/faulty_instret.py ARGS...

dies at the N-th rename onto a file called NAME, just before it (WHEN=before) or just after
(WHEN=after): the two sides of the commit point of every atomic write.
"""

import os
import signal
import sys

name, nth, when = os.environ["INSTRET_KILL_AT"].split(":")
seen = 0
real_replace = os.replace


def replace(src, dst, *args, **kwargs):
    global seen
    hit = os.path.basename(os.fspath(dst)) == name
    seen += hit
    if hit and seen == int(nth) and when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst, *args, **kwargs)
    if hit and seen == int(nth) and when == "after":
        os.kill(os.getpid(), signal.SIGKILL)


os.replace = replace

from instret.cli.main import main  # noqa: E402  (after the patch, so every write sees it)

main(sys.argv[1:])
