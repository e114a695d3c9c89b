"""The one exception type that reaches the user as a single line and exit code 2."""


class UserError(Exception):
    """Bad input: unknown names, impossible lengths, malformed files.

    The CLI prints ``error: <message>`` on one line of stderr and exits with code 2.
    """


class NumericalError(UserError):
    """A forward pass produced NaN or inf (e.g. float16 overflow); names the first bad layer."""
