"""User-facing errors.

Anything a user can cause (a bad path, a bad config key, a corrupt video, ...) is raised as a
:class:`UserError`. The command line prints its message as one line on stderr and exits with
status 2; no traceback. Code that is not driven by the CLI can catch it like any exception.
"""

from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit status 2."""

    exit_code = 2

    def __init__(self, message: str, *, path: str | Path | None = None):
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)


class ConfigError(UserError):
    """An unknown key, a wrong type or an invalid value in a config or a --set override."""


class VideoError(UserError):
    """A video that cannot be opened, is corrupt, empty, or too short for what was asked."""
