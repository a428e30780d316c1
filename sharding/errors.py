"""Errors a user can fix: bad input data or bad configuration (CLI exit code 2)."""


class InputError(ValueError):
    """Bad input or configuration: the message names the file/record/key and the fix."""
