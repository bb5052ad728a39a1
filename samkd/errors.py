"""Errors that a user can fix: the command line shows their one-line message, not a traceback."""


class UsageError(ValueError):
    """A job cannot start with what it was given (missing dataset, unavailable device, ...)."""
