"""Errors a user can act on. Entry points print these without a traceback."""


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
