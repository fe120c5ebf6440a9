"""Deferred writes of the database facade: the single-writer rule
(docs/database.md#single-writer-and-deferred-writes).

Only the coordinator writes. Worker processes call ``db.set_deferred(True)``: every write method
then records a picklable :class:`DbOp` instead of executing; the worker returns
``db.take_deferred()`` and the coordinator runs ``db.apply(ops, job=...)``, which executes the
operations and the job transition in one transaction.

Each write method ``name`` checks its arguments and calls ``self._write(self._name_impl, ...)``;
``_name_impl(session, ...)`` is declared with :func:`write_op`, which is what lets
:meth:`DeferredWrites.apply` execute a recorded ``DbOp("name", ...)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy.orm import Session

from modules.SQLModule.connection import Connection
from modules.SQLModule.models import COMAPData

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

WRITE_OPS: dict[str, Callable[..., Any]] = {}
"""Deferrable write operations: name -> implementation ``(facade, session, *args, **kwargs)``."""


@dataclass
class DbOp:
    """One deferred write: the facade method ``name`` called with ``args``/``kwargs``
    (docs/database.md#single-writer-and-deferred-writes).

    Instances are plain data and pickle; :meth:`SQLModule.apply` executes a list of them.
    """

    name: str
    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


def write_op(name: str) -> Callable[[F], F]:
    """Declare a method as the implementation of the deferrable write operation ``name``.

    Parameters
    ----------
    name : str
        The public write method (and :attr:`DbOp.name`) the implementation serves.

    Returns
    -------
    callable
        Decorator that registers the method in :data:`WRITE_OPS` and returns it unchanged.
    """

    def register(impl: F) -> F:
        if name in WRITE_OPS:
            raise ValueError(f"write operation {name!r} is declared twice")
        impl.write_op_name = name  # type: ignore[attr-defined]
        WRITE_OPS[name] = impl
        return impl

    return register


class DeferredWrites(Connection):
    """Write path of the facade: execute a write now, or record it for the coordinator
    (docs/database.md#single-writer-and-deferred-writes)."""

    def __init__(self) -> None:
        super().__init__()
        self._deferred: bool = False
        self._ops: list[DbOp] = []

    def set_deferred(self, deferred: bool = True) -> bool:
        """Switch deferred-write mode on or off for this process.

        Parameters
        ----------
        deferred : bool
            When True, every write method records a :class:`DbOp` instead of executing and
            returns None. ``claim_jobs`` is not deferrable and raises.

        Returns
        -------
        bool
            The previous setting, so callers can restore it.
        """
        previous = self._deferred
        self._deferred = bool(deferred)
        return previous

    @property
    def deferred(self) -> bool:
        """True while writes are recorded instead of executed."""
        return self._deferred

    @contextmanager
    def deferring(self) -> Iterator[list[DbOp]]:
        """Record writes made inside the block into the yielded list (restores the mode after).

        Useful for the in-process serial executor: ``with db.deferring() as ops: ...``.
        """
        previous_mode, previous_ops = self._deferred, self._ops
        ops: list[DbOp] = []
        self._deferred, self._ops = True, ops
        try:
            yield ops
        finally:
            self._deferred, self._ops = previous_mode, previous_ops

    def peek_deferred(self) -> list[DbOp]:
        """A copy of the operations recorded so far, without clearing them (e.g. for snapshots)."""
        return list(self._ops)

    def take_deferred(self) -> list[DbOp]:
        """Return the recorded operations and clear the list."""
        ops, self._ops = self._ops, []
        return ops

    def _write(self, impl: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
        """Run the write implementation ``impl(session, *args, **kwargs)``, or record it as a :class:`DbOp`.

        Parameters
        ----------
        impl : bound method
            A ``_<name>_impl`` method registered with :func:`write_op`.
        *args, **kwargs
            Its arguments after the session: already checked and converted to plain data, since a
            recorded operation is pickled and applied later, possibly in another process.

        Returns
        -------
        object or None
            The implementation's result; None in deferred mode.
        """
        name = impl.write_op_name
        if self._deferred:
            self._ops.append(DbOp(name, tuple(args), dict(kwargs)))
            return None
        return self._run_write(name, lambda s: impl(s, *args, **kwargs))

    def apply(self, ops: Iterable[DbOp], *, job: Mapping[str, Any] | None = None) -> list[Any]:
        """Execute deferred operations, and optionally a job transition, in ONE transaction.

        Parameters
        ----------
        ops : iterable of DbOp
            Operations recorded by :meth:`take_deferred` (or built by hand).
        job : mapping or None
            Keyword arguments of :meth:`finish_job` applied in the same transaction, e.g.
            ``dict(obsid=60012, stage='level2', status='done', error=None, last_module='X')``.

        Returns
        -------
        list
            The return value of each operation (the job transition is not included). In deferred
            mode the operations (and the job as a ``finish_job`` op) are recorded and ``[]`` is
            returned.

        Raises
        ------
        ValueError
            An operation names an unknown method. Nothing is executed.
        DatabaseError
            A database error; the whole transaction is rolled back. Exceptions raised by an
            operation's validation (e.g. ValueError) also roll back everything.
        """
        ops = list(ops)
        for op in ops:
            if not isinstance(op, DbOp) or op.name not in WRITE_OPS:
                raise ValueError(f"apply: not a deferrable write operation: {op!r}")
        if self._deferred:
            self._ops.extend(ops)
            if job is not None:
                self._ops.append(DbOp("finish_job", (), dict(job)))
            return []

        def run(s: Session) -> list[Any]:
            results = [WRITE_OPS[op.name](self, s, *op.args, **op.kwargs) for op in ops]
            if job is not None:
                WRITE_OPS["finish_job"](self, s, **dict(job))
            return results

        return self._run_write("apply", run)

    def _require_observation(self, s: Session, obsid: int, what: str) -> COMAPData:
        """Return the registered observation ``obsid`` or raise :class:`DatabaseError` for ``what``."""
        obs = s.get(COMAPData, obsid)
        if obs is None:
            raise self._fail(what, f"obsid {obsid} is not registered")
        return obs
