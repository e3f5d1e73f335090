"""User-facing errors: one line, naming the file or value and what is wrong."""


class DanceError(Exception):
    """A problem with the user's input (path, value, data). The CLI prints it as one line."""
