"""A user mistake (bad config, bad data, wrong checkpoint): reported as one line, exit status 2.

Anything else is a bug or a system failure and keeps its traceback (in the log file, and on the
console with AND_DEBUG=1)."""


class UserError(Exception):
    """The message is one line meant for the terminal."""


EXIT_USER_ERROR = 2
