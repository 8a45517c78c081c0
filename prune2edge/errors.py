"""The one exception type for mistakes a user can fix."""


class UserError(Exception):
    """Bad input or configuration: the message says what is wrong and how to fix it."""
