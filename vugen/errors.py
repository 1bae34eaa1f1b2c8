"""Errors a user can fix, and how the ``vugen`` command tells them apart from bugs.

vugen checks its input on purpose (configs, files, checkpoints, bundles, caches, data) and raises with a message
that names the file, key or argument, what was expected and what to do. Those are *known* errors: the command prints
their message in one line and exits non-zero; anything else is a bug (ours or a library's) and keeps its traceback.
``VUGEN_TRACEBACK=1`` (or ``vugen --traceback``) shows the traceback of a known error too.

Known errors are :class:`VugenError` and its subclasses, the file errors of the OS (they name the path), and the
``ValueError`` / ``TypeError`` / ``KeyError`` that vugen's own code raises (an argument check), found through the
chain of causes, since Lightning and jsonargparse re-raise an instantiation error wrapped in their own.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["VugenError", "check_positive", "known_error_message"]

TRACEBACK_ENV = "VUGEN_TRACEBACK"

# vugen's own source trees: an argument check raised from here is a known error, not a bug.
_OWN_PACKAGES = tuple(
    f"{Path(__file__).resolve().parent.parent / name}{os.sep}" for name in ("vugen", "adapters", "vugen_adapters")
)
_FILE_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, FileExistsError)
_CHECK_ERRORS = (ValueError, TypeError, KeyError)
# jsonargparse's wrapping of a value that matched no type: lines that say nothing about what is wrong.
_PARSER_NOISE = re.compile(
    r"^(Does not validate against any of the Union subtypes|Subtypes:|Errors:|Given value|"
    r"Expected a <class 'NoneType'>|Problem with given class_path)"
)
_PARSER_KEY = re.compile(r'Parser key "([^"]+)":?\s*')


class VugenError(Exception):
    """Bad input that vugen detected: a config, file, checkpoint, bundle, cache or dataset the user can fix.

    The message is complete on its own: what is wrong, where (file, key or argument) and what to do.
    """


def check_positive(name: str, value: int) -> None:
    """An argument check: ``value`` must be an integer >= 1 (not a bool).

    Raises:
        ValueError: ``"{name} must be a positive integer, got {value!r}"``.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def known_error_message(error: BaseException) -> str | None:
    """The message to print for a known error, or None when ``error`` looks like a bug (keep its traceback).

    Args:
        error: The exception that ended a command.

    Returns:
        One line (two at most) naming what was wrong, or None.
    """
    chain = _cause_chain(error)
    for cause in chain:  # vugen's own wording first: it may translate a library's error (a Hub lookup, ...)
        if isinstance(cause, VugenError):
            return _message(cause)
    for cause in reversed(chain):  # else the root cause says most; wrappers repeat it with noise
        if _is_known(cause):
            return _message(cause)
    if _is_argument_error(error):
        return _parser_message(str(error))
    return None


def _is_known(error: BaseException) -> bool:
    if isinstance(error, (VugenError, *_FILE_ERRORS)):
        return True
    return isinstance(error, _CHECK_ERRORS) and _raised_by_us(error)


def _cause_chain(error: BaseException) -> list[BaseException]:
    """``error`` and its explicit causes (``raise ... from``), outermost first."""
    chain = [error]
    while chain[-1].__cause__ is not None and chain[-1].__cause__ not in chain:
        chain.append(chain[-1].__cause__)
    return chain


def _raised_by_us(error: BaseException) -> bool:
    """Whether the innermost frame of ``error``'s traceback is in vugen's own code (an argument check)."""
    traceback = error.__traceback__
    if traceback is None:
        return False
    while traceback.tb_next is not None:
        traceback = traceback.tb_next
    filename = str(Path(traceback.tb_frame.f_code.co_filename).resolve())
    return filename.startswith(_OWN_PACKAGES)


def _message(error: BaseException) -> str:
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    return text.strip() or type(error).__name__


def _is_argument_error(error: BaseException) -> bool:
    from argparse import ArgumentError

    from jsonargparse import ArgumentError as ParserError

    return isinstance(error, ArgumentError | ParserError)


def _parser_message(text: str) -> str:
    """jsonargparse's nested report as ``key.path: reason``: the keys it went through and its deepest reason."""
    keys = _PARSER_KEY.findall(text)
    lines = (_PARSER_KEY.sub("", line).strip().lstrip("- ").strip() for line in text.splitlines())
    reasons = [line for line in lines if line and not _PARSER_NOISE.match(line)]
    reason = reasons[-1] if reasons else text.strip()
    key = ".".join(dict.fromkeys(keys))  # a key can repeat on its way down
    return f"{key}: {reason}" if key else reason
