"""torchrun without its own noise: `python -m pgolf.agent <torchrun arguments>`.

A rank that fails reports its own error to the launching process (pgolf.dist.launch), which
makes it the stage's first error line; torchrun's failure summary and log lines would come
before it on stderr, so they are shown only when PGOLF_TRACEBACK asks for detail. Ctrl-C ends it
with 130 and no traceback: the ranks it stopped report where."""
from __future__ import annotations

import logging
import os
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run

from pgolf.dist import TRACEBACK_ENV, leave_now


def main(argv: list[str]) -> int:
    verbose = bool(os.environ.get(TRACEBACK_ENV))
    if not verbose:
        # torch.distributed.elastic's modules set their own loggers' levels (LOGLEVEL, default
        # WARNING) when imported, so quieting the parent is not enough.
        for name in ["torch.distributed", *logging.root.manager.loggerDict]:
            if name.startswith("torch.distributed"):
                logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        run(parse_args(argv))
    except ChildFailedError as err:
        if verbose:
            print(err.format_msg(), file=sys.stderr)
        return 1
    except SignalException as err:
        # Ctrl-C (or a SIGTERM): torchrun has passed it to the ranks and waited for them; they say
        # where they stopped (pgolf.dist.first_rank_error), so no traceback here.
        leave_now(128 + int(err.sigval))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
