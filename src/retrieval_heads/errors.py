"""The one exception type that reaches the user as a single line and exit code 2, and its one-line helper."""


from __future__ import annotations


class UserError(Exception):
    """Bad input: unknown names, impossible lengths, malformed files.

    The CLI prints ``error: <message>`` on one line of stderr and exits with code 2.
    """


class ParamError(UserError):
    """A UserError about one parameter, named as the Python API calls it (``tokens must be positive, got 0``);
    the CLI names the flag instead (``--tokens must be positive, got 0``), in one place
    (:func:`retrieval_heads.spec.cli_message`). The message is ``prefix + param + rest``.

    >>> str(ParamError("tokens", " must be positive, got 0"))
    'tokens must be positive, got 0'
    >>> str(ParamError("rank_by", " 'x'; choose from: score, lift", prefix="unknown "))
    "unknown rank_by 'x'; choose from: score, lift"
    """

    def __init__(self, param: str, rest: str, prefix: str = ""):
        super().__init__(f"{prefix}{param}{rest}")
        self.param, self.rest, self.prefix = param, rest, prefix

    def named(self, name: str) -> str:
        """The message with the parameter called ``name`` (e.g. its flag)."""
        return f"{self.prefix}{name}{self.rest}"

    def __reduce__(self):  # pickled whole (a Ray worker's error reaches the driver as itself)
        return type(self), (self.param, self.rest, self.prefix)


class NumericalError(UserError):
    """A forward pass produced NaN or inf (e.g. float16 overflow); names the first bad layer."""


def first_line(e: BaseException, default: str | None = None) -> str:
    """The first line of an exception's message, for one-line errors; ``default`` (else the exception's type
    name) when the message is empty."""
    lines = [x.strip() for x in str(e).strip().splitlines() if x.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):  # "Validation error for field 'x':" + the reason on the next line
        return f"{lines[0]} {lines[1]}"
    if lines:
        return lines[0]
    return type(e).__name__ if default is None else default
