"""The one exception the CLI turns into a one-line message and a non-zero exit."""


class UserError(Exception):
    """Bad input or environment: the message is for the user, the traceback is not."""


class VerifyFailed(UserError):
    """A file was read fine but failed a check (exit 1 where usage errors give 2)."""
