"""The exporter's one error type, shared by every command."""


class UserError(Exception):
    """A problem with what the user asked for; the CLI prints it without a traceback."""
