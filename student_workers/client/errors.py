"""The errors a teacher client raises: ``TeacherError`` and its kinds, picklable across Ray."""
from __future__ import annotations

import grpc

DETAILS_CHARS = 300  # of a server's message quoted in ours


def clip(text: str, limit: int = DETAILS_CHARS) -> str:
    """One printable line: a server (or proxy) message may be long or hold control characters."""
    out = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text[: limit + 1])
    return out if len(out) <= limit else out[: limit - 3] + "..."


def _rebuild(cls: type, message: str, state: dict) -> "TeacherError":
    err = cls.__new__(cls)
    err.args = (message,)
    err.__dict__.update(state)
    return err


class TeacherError(RuntimeError):
    """The teacher answered with a non-OK status (or its answer cannot be used).

    ``code`` is a ``grpc.StatusCode`` (the vocabulary of every transport kdserve speaks);
    ``details`` the server's message; ``address`` the teacher asked. Picklable (errors of a
    Ray Train worker travel to the driver), subclasses included.
    """

    def __init__(self, code: grpc.StatusCode, details: str, address: str = "", message: str | None = None):
        self.code = code
        self.details = details
        self.address = address
        super().__init__(message or f"teacher at {address or '?'} answered {code.name}: {clip(details)}")

    def __reduce__(self):
        # The default rebuilds with cls(*self.args), which does not match these __init__s.
        return _rebuild, (type(self), str(self), dict(self.__dict__))


class TeacherUnavailable(TeacherError):
    """The retry budget for UNAVAILABLE / DEADLINE_EXCEEDED is spent: the teacher is not answering.

    ``elapsed_s``: seconds from the first attempt to giving up; ``attempts``: calls made.
    """

    elapsed_s: float = 0.0
    attempts: int = 0


class FingerprintMismatch(TeacherError):
    """A reply came from a different teacher (weights or preprocessing) than the run started with."""

    def __init__(self, address: str, expected: str, got: str):
        self.expected = expected
        self.got = got
        super().__init__(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"fingerprint {got!r}, expected {expected!r}",
            address,
            message=(
                f"teacher at {address} now has fingerprint {got!r} but this run uses {expected!r}: "
                "the teacher's weights or preprocessing changed; targets from two teachers must never "
                "mix in one run (restart the run, or point it at the original teacher)"
            ),
        )
