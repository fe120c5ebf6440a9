"""Logging for a run: one log file, obsid context on every record, worker queues, tqdm
(docs/operations.md#logging).

* ``obsid_context(obsid)`` sets the current observation; a filter on every handler puts it on the
  record as a 7-digit string (``-`` outside an observation). Modules never format it themselves.
* The console shows one line per record and never a traceback; the log file keeps tracebacks.
* Worker processes send records through a ``QueueHandler``; the coordinator's ``QueueListener`` is
  the only writer of the log file.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import datetime as _dt
import logging
import logging.handlers
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

_OBSID: contextvars.ContextVar[int | None] = contextvars.ContextVar("comap_obsid", default=None)

FILE_FORMAT = "%(asctime)s %(levelname)-7s [%(obsid)s] %(name)s: %(message)s"
CONSOLE_FORMAT = "%(levelname)s [%(obsid)s] %(shortname)s: %(message)s"

T = TypeVar("T")


@contextlib.contextmanager
def obsid_context(obsid: int | None) -> Iterator[None]:
    """Attach ``obsid`` to every log record emitted inside the block."""
    token = _OBSID.set(None if obsid is None else int(obsid))
    try:
        yield
    finally:
        _OBSID.reset(token)


class ObsidFilter(logging.Filter):
    """Inject ``record.obsid`` (7-digit or ``-``) and ``record.shortname`` (name without ``comap.``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "obsid") or record.obsid in (None, ""):
            obsid = _OBSID.get()
            record.obsid = "-" if obsid is None else f"{obsid:07d}"
        elif isinstance(record.obsid, int):
            record.obsid = f"{record.obsid:07d}"
        name = record.name
        record.shortname = name[6:] if name.startswith("comap.") else name
        return True


class _UTCFormatter(logging.Formatter):
    def formatTime(self, record, datefmt=None):
        t = _dt.datetime.fromtimestamp(record.created, _dt.UTC)
        return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{int(record.msecs):03d}Z"


class _ConsoleFormatter(logging.Formatter):
    """One line per record: no traceback (it is in the log file)."""

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            return " ".join(super().format(record).splitlines())
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


class _TqdmStreamHandler(logging.StreamHandler):
    """Console handler that writes through ``tqdm.write`` so lines do not break progress bars."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


class RunLogging:
    """Handles of the run's logging; ``close()`` flushes and detaches them."""

    def __init__(self, log_file: Path | None, level: int) -> None:
        self.log_file = log_file
        self.level = level
        self.handlers: list[logging.Handler] = []
        self.queue: Any = None
        self.listener: logging.handlers.QueueListener | None = None

    def start_queue(self, mp_context) -> Any:
        """Create the multiprocessing queue workers log into, and start its listener."""
        if self.queue is None:
            self.queue = mp_context.Queue(-1)
            self.listener = logging.handlers.QueueListener(
                self.queue, *self.handlers, respect_handler_level=True
            )
            self.listener.start()
        return self.queue

    def stop_queue(self) -> None:
        if self.listener is not None:
            self.listener.stop()
            self.listener = None
        if self.queue is not None:
            self.queue.close()
            self.queue.join_thread()
            self.queue = None

    def close(self) -> None:
        self.stop_queue()
        root = logging.getLogger("comap")
        for h in self.handlers:
            root.removeHandler(h)
            h.close()
        self.handlers.clear()


def setup_logging(
    log_file: str | Path | None, level: str | int = "INFO", *, console: bool = True
) -> RunLogging:
    """Configure the ``comap`` logger for a run: file handler (full, with tracebacks) and console.

    Parameters
    ----------
    log_file : path or None
        Log file; its parent directory is created. None logs to the console only.
    level : str or int
        ``DEBUG``, ``INFO``, ``WARNING`` or ``ERROR`` (console and file).
    """
    lvl = logging.getLevelName(level.upper()) if isinstance(level, str) else int(level)
    root = logging.getLogger("comap")
    for h in list(root.handlers):
        root.removeHandler(h)
    root.setLevel(lvl)
    root.propagate = False
    run = RunLogging(Path(log_file) if log_file else None, lvl)
    flt = ObsidFilter()
    if log_file:
        path = Path(log_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(path, encoding="utf-8")
        fh.setFormatter(_UTCFormatter(FILE_FORMAT))
        fh.addFilter(flt)
        fh.setLevel(lvl)
        run.handlers.append(fh)
    if console:
        ch = _TqdmStreamHandler(sys.stderr)
        ch.setFormatter(_ConsoleFormatter(CONSOLE_FORMAT))
        ch.addFilter(flt)
        ch.setLevel(lvl)
        run.handlers.append(ch)
    for h in run.handlers:
        root.addHandler(h)
    return run


def setup_worker_logging(queue, level: int) -> None:
    """In a worker process: send every ``comap`` record to the coordinator through ``queue``."""
    root = logging.getLogger("comap")
    for h in list(root.handlers):
        root.removeHandler(h)
    root.setLevel(level)
    root.propagate = False
    if queue is not None:
        qh = _ObsidQueueHandler(queue)
        qh.addFilter(ObsidFilter())
        root.addHandler(qh)


class _ObsidQueueHandler(logging.handlers.QueueHandler):
    """QueueHandler that sends the message and the formatted traceback as separate fields.

    The standard ``prepare`` folds the traceback into the message, where the console handler (one
    line per record, no traceback) could no longer leave it out; here the traceback stays in
    ``exc_text``, which only the log file's formatter prints (docs/operations.md#logging)."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        record = copy.copy(record)
        record.msg = record.getMessage()
        record.args = None
        record.exc_info = None  # not picklable; its text is in exc_text
        return record


class Progress:
    """A progress report: a tqdm bar on a TTY stderr, and an INFO line each time another 10 % is done.

    The bar is disabled when stderr is not a terminal, so non-interactive logs stay clean; the
    10 % lines show progress in the log file either way.
    """

    def __init__(
        self, total: int | None, *, desc: str, logger: logging.Logger | None = None, unit: str = "it"
    ) -> None:
        from tqdm import tqdm

        self.total = total
        self.desc = desc
        self.count = 0
        self._decile = 0
        self._log = logger or logging.getLogger("comap.progress")
        disable = not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty())
        self._bar = tqdm(total=total, desc=desc, disable=disable, unit=unit, leave=False)

    def update(self, n: int = 1) -> None:
        self.count += n
        self._bar.update(n)
        if self.total:
            decile = min(10, (self.count * 10) // self.total)
            if decile > self._decile:
                self._decile = decile
                self._log.info(
                    "%s: %d/%d (%d%%)", self.desc, self.count, self.total, (100 * self.count) // self.total
                )

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(
    iterable: Iterable[T],
    *,
    desc: str,
    total: int | None = None,
    logger: logging.Logger | None = None,
    unit: str = "it",
) -> Iterator[T]:
    """Iterate with a :class:`Progress` report (one update after each item is consumed)."""
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    with Progress(total, desc=desc, logger=logger, unit=unit) as bar:
        for item in iterable:
            yield item
            bar.update(1)
