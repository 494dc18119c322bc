"""Errors a person can fix, shared by every command line (`specdec`, `python -m verifier_worker.serve`).

A UserError is printed as one line and a non-zero exit code, never a traceback. `user_errors` turns the
expected failures of one step (a file that does not exist, a model that does not load) into a UserError
that says which step failed.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator

LOAD_ERRORS = (OSError, ValueError, RuntimeError, ImportError)  # what loading a model or a file raises


class UserError(Exception):
    """Something the user can fix; printed as one line."""


@contextlib.contextmanager
def user_errors(what: str, *types: type[BaseException]) -> Iterator[None]:
    """Re-raise any of `types` (default: LOAD_ERRORS) as UserError(f"{what}: {exc}")."""
    try:
        yield
    except types or LOAD_ERRORS as exc:
        raise UserError(f"{what}: {exc}") from exc


def run_command(action: Callable[[], object], verbose: bool = False) -> int:
    """Run one command-line action: logging set up, a UserError as one line and exit 1, Ctrl-C as 130."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        action()
    except UserError as exc:
        print(f"specdec: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
