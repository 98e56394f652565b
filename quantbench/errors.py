"""User-facing errors: one line that names the problem and the fix."""


class QuantbenchError(Exception):
    """A problem the user can fix. The CLI prints it as one line and exits with status 2."""
