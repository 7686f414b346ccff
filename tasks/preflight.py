"""PROVISIONAL placeholder: the preflight helper replaces it."""


def preflight(config) -> None:
    return None
