"""`instret` that kills itself with SIGKILL at one atomic rename or link, for the interruption tests.

    INSTRET_KILL_AT=NAME:N:WHEN python tests/faulty_instret.py ARGS...

dies at the N-th rename (os.replace) or hard link (os.link: a `dups --move-to` step) onto a file
called NAME (`*`: any), just before it (WHEN=before) or just after (WHEN=after): the two sides of
the commit point of every atomic write and every move.
"""

import os
import signal
import sys

name, nth, when = os.environ["INSTRET_KILL_AT"].split(":")
seen = 0


def dying(real):
    def step(src, dst, *args, **kwargs):
        global seen
        hit = name in ("*", os.path.basename(os.fspath(dst)))
        seen += hit
        if hit and seen == int(nth) and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        real(src, dst, *args, **kwargs)
        if hit and seen == int(nth) and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)

    return step


os.replace = dying(os.replace)
os.link = dying(os.link)

from instret.cli.main import main  # noqa: E402  (after the patch, so every write sees it)

main(sys.argv[1:])
