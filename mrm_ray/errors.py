"""The one base class for mistakes in a user's input.

The CLI prints such an error as one line on stderr and exits with status 2;
anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input (a table, a config value, a location): the message is one line for a user."""
