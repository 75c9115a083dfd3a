"""User-facing errors and warnings.

`UserError`: bad input from the user. The CLI prints `nanoseek <cmd>: error: <message>` (one line, no
traceback) and exits with status 2. `warn` prints `nanoseek: warning: <message>` to stderr, one line,
instead of Python's `UserWarning` lines that quote source code.
"""

from __future__ import annotations

import math
import sys


class UserError(Exception):
    """Bad input from the user: a missing file, a malformed dataset, an impossible setting."""


class SettingError(UserError, ValueError):
    """A setting (config field, CLI flag) outside its allowed range."""


_hard_exit = False


def request_hard_exit() -> None:
    """Ask the `nanoseek` command to end this process with `os._exit` once its output is flushed.

    Set by multi-process runs: gloo's C++ threads can call std::terminate ("terminate called without an
    active exception", SIGABRT) while the interpreter tears down a destroyed or broken process group, which
    would turn a finished run or a clean error into a crash. By then every file is closed and fsynced."""
    global _hard_exit
    _hard_exit = True


def hard_exit_requested() -> bool:
    return _hard_exit


def warn(message: str) -> None:
    """One warning line on stderr."""
    print(f"nanoseek: warning: {message}", file=sys.stderr, flush=True)


def require(ok: bool, setting: str, value, allowed: str) -> None:
    """Raise `SettingError` naming the setting, its value and the allowed range unless `ok`."""
    if not ok:
        raise SettingError(f"invalid setting `{setting}` = {value!r}: must be {allowed}")


def is_finite_number(x) -> bool:
    """True for an int or float (not bool) that is neither NaN nor infinite."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
