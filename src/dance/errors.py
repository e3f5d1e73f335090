"""User-facing errors: one line, naming the file or value and what is wrong."""


class DanceError(Exception):
    """A problem with the user's input (path, value, data). The CLI prints it as one line."""


class WriteError(DanceError, OSError):
    """A file could not be written (disk full, read-only folder): one line naming the file, and
    the previous file is intact. Also an OSError, so code that tolerates a failed write (the
    score cache) catches it as one."""

    def __init__(self, message: str, errno: int | None = None, filename: str | None = None,
                 reason: str | None = None):
        DanceError.__init__(self, message)
        self.message, self.errno, self.filename = message, errno, filename
        self.reason = self.strerror = reason or message

    def __str__(self) -> str:
        return self.message
