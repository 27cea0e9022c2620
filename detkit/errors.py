"""Errors that mean "the input is wrong", shown to users as one clear line."""


class UserError(ValueError):
    """Bad input (a file, an argument, a config value): the message names it and the problem."""


class NotBuiltError(UserError):
    """A sub-command or option that this version of detkit does not provide yet."""
