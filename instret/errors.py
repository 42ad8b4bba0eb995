"""The one exception type whose message is shown to users as a one-line error."""


class InstretError(Exception):
    """A problem with the user's input or files; the CLI prints it as one line and exits 1."""
