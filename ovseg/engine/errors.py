"""Errors the command line reports as one line (no traceback): the user can fix them without reading our code."""


class UserError(Exception):
    """A problem with the command line, the config, the data or a weights file, stated so the user can fix it."""


class NonFiniteLossError(UserError, FloatingPointError):
    """Training stopped because the loss (or what it is computed from) became NaN / Inf."""
