"""torchrun without its own noise: `python -m pgolf.agent <torchrun arguments>`.

A rank that fails reports its own error to the launching process (pgolf.dist.launch), which
makes it the stage's first error line; torchrun's failure summary and log lines would come
before it on stderr, so they are shown only when PGOLF_TRACEBACK asks for detail."""
from __future__ import annotations

import logging
import os
import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run

from pgolf.dist import TRACEBACK_ENV


def main(argv: list[str]) -> int:
    verbose = bool(os.environ.get(TRACEBACK_ENV))
    if not verbose:
        logging.getLogger("torch.distributed").setLevel(logging.CRITICAL)
    try:
        run(parse_args(argv))
    except ChildFailedError as err:
        if verbose:
            print(err.format_msg(), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
