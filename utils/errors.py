"""Exception types shared by every layer (docs/operations.md#error-model).

They live in ``utils`` because the level-1 reader and the database facade raise them and must not
import ``modules``; ``modules.pipeline_control.Pipeline`` re-exports them for user modules.
"""

from __future__ import annotations


class COMAPError(Exception):
    """Base class of every comap-reduce error."""


class BadCOMAPFile(COMAPError):
    """An input cannot be processed; that observation stops, the batch continues.

    Accepted forms::

        BadCOMAPFile("missing dataset spectrometer/MJD", obsid=60012)
        BadCOMAPFile("missing dataset spectrometer/MJD")      # obsid filled in by the runner
        BadCOMAPFile(60012, "missing dataset ...")            # legacy positional form

    ``str()`` is ``"ObsID {obsid}: {message}"`` once the obsid is known, else the message alone.
    """

    def __init__(self, *args: object, obsid: int | None = None) -> None:
        if len(args) == 2 and isinstance(args[0], int | None) and not isinstance(args[0], bool):
            obsid, message = args[0], str(args[1])
        elif len(args) == 1:
            message = str(args[0])
        elif not args:
            message = "unknown problem"
        else:
            raise TypeError("BadCOMAPFile(message, *, obsid=None) or BadCOMAPFile(obsid, message)")
        self.message: str = _one_line(message)
        self.obsid: int | None = None if obsid is None else int(obsid)
        super().__init__(self.message)

    def __str__(self) -> str:
        if self.obsid is None:
            return self.message
        return f"ObsID {self.obsid}: {self.message}"

    def __reduce__(self):  # keep obsid across process boundaries
        return (_rebuild_bad_file, (type(self), self.message, self.obsid))


def _rebuild_bad_file(cls, message, obsid):
    return cls(message, obsid=obsid)


class Level1FormatError(BadCOMAPFile):
    """A level-1 file fails one of the validation checks C1–C13 (docs/formats/level1.md#validity-checks)."""


class ConfigError(COMAPError):
    """A configuration problem, reported before any work as
    ``ConfigError: <file>: <where>: <message>: <text>`` (docs/configuration.md#validation).

    Parts that are None are left out of the line.
    """

    def __init__(
        self,
        message: str,
        file: str | None = None,
        where: str | None = None,
        text: str | None = None,
    ) -> None:
        self.message = _one_line(str(message))
        self.file = None if file is None else str(file)
        self.where = None if where is None else str(where)
        self.text = None if text is None else _one_line(str(text))
        super().__init__(self.message)

    def __str__(self) -> str:
        # a file name keeps its characters, but a line break in it is shown escaped
        parts = [_escape_breaks(self.file), _escape_breaks(self.where), self.message, self.text]
        return ": ".join(p for p in parts if p not in (None, ""))

    def line(self) -> str:
        """The console line: ``ConfigError: <file>: <where>: <message>: <text>``."""
        return f"ConfigError: {self}"

    def __reduce__(self):
        return (type(self), (self.message, self.file, self.where, self.text))


class ConfigErrors(COMAPError):
    """Several configuration problems collected together; each is printed on its own line."""

    def __init__(self, errors: list[ConfigError]) -> None:
        # The same problem can be reached by two routes (e.g. a file included twice); say it once.
        lines: dict[str, ConfigError] = {}
        for error in errors:
            lines.setdefault(error.line(), error)
        self.errors = list(lines.values())
        super().__init__("\n".join(e.line() for e in self.errors))


class DatabaseError(COMAPError):
    """The database is unreachable, locked beyond the busy timeout, or has the wrong schema."""


class DatabaseMissing(DatabaseError):
    """The database does not exist or has no tables, and creating it was not asked for
    (docs/database.md#connection): usually a mistyped ``sql_database``."""


class SimulatorError(COMAPError):
    """The simulator was asked for something it cannot produce (e.g. a scan below 25° elevation)."""


def _one_line(text: str) -> str:
    """Collapse a message to one line: messages are one line by contract (docs/operations.md#error-model rule
    1)."""
    # any line boundary str.splitlines knows (\v, \f, \x1c-\x1e, \x85, \u2028, \u2029 as well as
    # \n and \r) would split the line (docs/reliability.md#config-fuzzing)
    return " ".join(text.split()) if len(text.splitlines()) > 1 or text != text.rstrip("\n\r") else text


def _escape_breaks(text: str | None) -> str | None:
    """``text`` with every line boundary of ``str.splitlines`` written as an escape (``\\u2028``)."""
    if text is None or len(text.splitlines()) <= 1 and text == text.rstrip("\n\r"):
        return text
    return "".join(c.encode("unicode_escape").decode() if len(f"a{c}b".splitlines()) > 1 else c for c in text)
