"""The one exception type for mistakes a user can fix (bad config, bad path, bad input)."""


class InstructflowError(ValueError):
    """Something the user asked for cannot be done; the message says what was wrong and how to fix it.

    The command line prints the message alone, without a traceback.
    """
