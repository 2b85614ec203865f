"""The error type of bad command-line input."""


class InputError(ValueError):
    """Bad user input (missing or corrupt file, wrong folder, ...); the CLI reports it in one line."""
