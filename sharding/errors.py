"""Errors a user can fix: bad input data or bad configuration (CLI exit code 2)."""


class InputError(ValueError):
    """Bad input or configuration: the message names the file/record/key and the fix."""


# How to keep going past bad rows, in a config or an override and on `vecgraph shard`.
SKIP_HINT = "set on_invalid=skip (vecgraph shard: --on-invalid skip)"
