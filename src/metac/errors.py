"""The error vocabulary, named for what the caller should do next.

Servers turn a ``MetacError`` into an RPC error whose text starts with its
category (``"NotFound: no such service 'x'"``); clients turn it back with
``from_kj``. Anything else raised in a server is our bug: it is logged with a
traceback and a correlation id, and the client only sees ``Internal: <id>``.
Messages never carry secrets.
"""

from __future__ import annotations

from collections.abc import Callable


class MetacError(Exception):
    """Base of the errors a caller acts on. ``exit_code`` is what the CLI returns."""

    category = "Error"
    exit_code = 1

    def __str__(self) -> str:
        return super().__str__() or self.category

    def wire(self) -> str:
        return f"{self.category}: {self}"


class NotFound(MetacError):
    category = "NotFound"
    exit_code = 3


class AlreadyExists(MetacError):
    category = "AlreadyExists"
    exit_code = 4


class InvalidArgument(MetacError):
    category = "InvalidArgument"
    exit_code = 2


class PermissionDenied(MetacError):
    category = "PermissionDenied"
    exit_code = 5


class FailedPrecondition(MetacError):
    category = "FailedPrecondition"
    exit_code = 6


class Unavailable(MetacError):
    category = "Unavailable"
    exit_code = 7


class Unsupported(MetacError):
    category = "Unsupported"
    exit_code = 8


class Internal(MetacError):
    category = "Internal"
    exit_code = 10


class MissingDependency(MetacError):
    """A local program is absent; the message names the Debian package."""

    category = "MissingDependency"
    exit_code = 9

    def __init__(self, program: str, package: str) -> None:
        super().__init__(f"{program} not found; install the Debian package '{package}'")
        self.program = program
        self.package = package

    @classmethod
    def parse(cls, message: str) -> MetacError:
        """Rebuild from the wire message; a message of another shape stays as is."""
        program, sep, rest = message.partition(" not found; install the Debian package '")
        if sep and rest.endswith("'"):
            return cls(program, rest[:-1])
        err = cls.__new__(cls)
        MetacError.__init__(err, message)
        err.program = err.package = ""
        return err


CATEGORIES: dict[str, type[MetacError]] = {
    cls.category: cls
    for cls in (
        NotFound,
        AlreadyExists,
        InvalidArgument,
        PermissionDenied,
        FailedPrecondition,
        Unavailable,
        Unsupported,
        Internal,
        MissingDependency,
    )
}


#: Turn an "unimplemented" error into a clearer one (schema.kinds: "this ref is not a
#: Filesystem" rather than a type id); registered by the module that knows the schemas.
EXPLAIN_UNIMPLEMENTED: list[Callable[[str], MetacError | None]] = []


def from_kj(exc: BaseException) -> MetacError:
    """Map an exception from an RPC call (a ``capnp.KjException``) to a MetacError."""
    if isinstance(exc, MetacError):
        return exc
    kj_type = str(getattr(exc, "type", "") or "")
    text = str(getattr(exc, "description", None) or exc)
    # pycapnp wraps remote errors as "remote exception: message = <Category>: ...",
    # once more for every proxying hop; the category follows the wrapping.
    stripped = True
    while stripped:
        stripped = False
        for prefix in ("remote exception: ", "message = "):
            if text.startswith(prefix):
                text = text[len(prefix):]
                stripped = True
    head, sep, rest = text.partition(": ")
    if sep and head == MissingDependency.category:
        return MissingDependency.parse(rest.strip())
    if sep and head in CATEGORIES:
        return CATEGORIES[head](rest.strip())
    if kj_type == "DISCONNECTED" or "disconnected" in text.lower():
        return Unavailable("connection lost: " + _first_line(text))
    if kj_type == "UNIMPLEMENTED" or "not implemented" in text.lower():
        for explain in EXPLAIN_UNIMPLEMENTED:
            explained = explain(text)
            if explained is not None:
                return explained
        return Unsupported(_first_line(text))
    if kj_type == "OVERLOADED":
        return Unavailable(_first_line(text))
    return Internal(_first_line(text))


def _first_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else "unknown error"
    return line[:300]
