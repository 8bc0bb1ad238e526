"""One error family for every user-facing failure: the message names the file and the fix."""
from __future__ import annotations

from pathlib import Path


class PgolfError(Exception):
    """Base of every error pgolf raises on purpose. Its message is meant for the user."""

    def __init__(self, message: str, path: str | Path | None = None):
        self.path = Path(path) if path is not None else None
        super().__init__(f"{path}: {message}" if path is not None else message)


class ConfigError(PgolfError):
    """A params file, preset or override is wrong."""


class InputError(PgolfError):
    """A stage input is missing, empty or unreadable."""


class FormatError(PgolfError):
    """A file exists but its content does not follow the format it claims."""


class CapExceededError(PgolfError):
    """The artifact (code + compressed model) is larger than the challenge allows."""


class TrainingError(PgolfError):
    """Training diverged (a non-finite loss) or is not learning (the loss of a uniform guess)."""


class StageInterrupted(PgolfError):
    """Ctrl-C (SIGINT) ended a stage. The message says where it stopped and what a rerun does; the
    stage exits 130 (128 + SIGINT) with that one line. A PgolfError, so no retry runs it again."""

    EXIT_CODE = 130
