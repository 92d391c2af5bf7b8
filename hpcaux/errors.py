"""The one exception type that reaches users as a single clear line.

Anything a user can get wrong (config, CLI arguments, data, run directories) raises
UserError; the CLI prints it as `hpcaux: error: ...` and exits with status 2 before
anything is written. Everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A mistake in the user's input, reported as one line with exit status 2."""

    exit_status = 2
