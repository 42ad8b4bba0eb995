"""`instret` whose search for duplicate pairs takes longer, for the page's progress test.

INSTRET_SLOW_SEARCH=SECONDS python tests/slow_instret.py ARGS...
"""

import os
import sys
import time

from instret import duplicates

searched = duplicates.candidate_pairs


def slowly(*args, **kwargs):
    time.sleep(float(os.environ["INSTRET_SLOW_SEARCH"]))
    return searched(*args, **kwargs)


duplicates.candidate_pairs = slowly

from instret.cli.main import main  # noqa: E402

main(sys.argv[1:])
