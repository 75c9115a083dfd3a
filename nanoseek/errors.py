"""User-facing errors: the CLI prints their message (no traceback) and exits with status 2."""


class UserError(Exception):
    """Bad input from the user: a missing file, a malformed dataset, an impossible setting."""
