"""Errors a user can fix. ``lopd`` prints them as one line and exits with code 2; any other exception is a
bug in lopd and keeps its traceback.

Both storage/ and pipeline/ raise these; this module imports nothing, so storage stays free of pipeline.
"""

from __future__ import annotations


class LopdUserError(ValueError):
    """Something the user can fix: a file, a config field, an input that is missing or damaged. The message
    says what is wrong, where (file, line, field, shard) and what to do. A ValueError, so code that catches
    ValueError keeps working."""


class MissingInputError(LopdUserError, FileNotFoundError):
    """A stage's input is missing or is not what the stage reads (a model dir without config.json, a
    directory that holds no shard set); the message names the stage that makes it."""
