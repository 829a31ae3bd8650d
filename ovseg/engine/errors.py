"""Errors the command line reports as one line (no traceback): the user can fix them without reading our code."""
import sys
from typing import Callable, Optional, Tuple, Type


class UserError(Exception):
    """A problem with the command line, the config, the data or a weights file, stated so the user can fix it."""


class NonFiniteLossError(UserError, FloatingPointError):
    """Training stopped because the loss (or what it is computed from) became NaN / Inf."""


def run_command(main: Callable[[], Optional[object]], user_errors: Tuple[Type[BaseException], ...] = ()) -> None:
    """Run a command-line tool's `main()` and exit: status `main`'s int result (0 for anything else), or 2 after one
    `error: ...` line on stderr for a user's mistake: a `UserError`, a missing file, weights that cannot be downloaded
    (offline) or one of `user_errors`. Anything else keeps its traceback (a bug to report)."""
    from ..utils.download import WeightsUnavailableError  # the downloader's errors, raised deep in model building

    try:
        status = main()
    except (UserError, FileNotFoundError, WeightsUnavailableError, *user_errors) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(status if isinstance(status, int) else 0)
