"""Errors a user can act on. Entry points print these without a traceback."""

import reprlib


class QatflowError(Exception):
    """A problem with the user's input, params or a quality gate, not a bug in qatflow."""


class ParamsError(QatflowError):
    pass


class DataError(QatflowError):
    pass


class GateFailed(QatflowError):
    pass


class ModelError(QatflowError):
    """The user's net cannot be imported, built, or taken through a target."""


QUOTED_CHARS = 80  # of a bad value quoted in an error; a huge value must not flood the terminal


def quoted(value: object, limit: int = QUOTED_CHARS) -> str:
    """repr(value), cut to its first `limit` characters plus '…': one bad value, one short line.

    Never a huge repr first: a long string is sliced, and reprlib cuts containers as it writes."""
    if isinstance(value, (str, bytes)):
        text = repr(value[: limit + 1])
    else:
        short = reprlib.Repr()
        short.maxstring = short.maxother = short.maxlong = limit
        short.maxlist = short.maxtuple = short.maxdict = short.maxset = max(1, limit // 4)
        text = short.repr(value)
    return text if len(text) <= limit else text[:limit] + "…"
