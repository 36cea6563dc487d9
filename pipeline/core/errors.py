"""Errors a user can act on, and the one place that turns them into a one-line message.

Every stage's `main()` is wrapped by `exit_on_user_error`: a `TonetuneError` (bad params, a
missing input file, a missing API key...) prints `error: <one line>` on stderr and exits 2
before any expensive work, instead of a traceback. Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable[..., object])


class TonetuneError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class ConfigError(TonetuneError):
    """params.yaml (or an override) has an unknown key, a wrong type or a bad value."""


def exit_on_user_error(func: F) -> F:
    """Run a CLI entry point; report a TonetuneError as one line on stderr and exit 2."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except TonetuneError as error:
            message = " ".join(str(error).split())
            print(f"error: {message}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper  # type: ignore[return-value]
