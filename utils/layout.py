"""File-layout registries: every dataset path of a COMAP HDF5 file, with its axes, dtype and units.

A :class:`Layout` holds the entries of one kind of file (level 1, level 2). Each entry is a
:class:`DatasetPath`: a ``str`` (so ``h5file[entry]`` works) that also carries its description.
Code refers to datasets only through these entries, so a path is spelled once.

Stages declare what they ``reads`` and ``writes`` as tuples of entries; the config loader checks
the chain before any work. A path with ``{placeholders}`` (``level2_noise_stats/{dataset}``) is a
template: a module formats it with its own parameters (:meth:`DatasetPath.resolve`).

User modules add their own entries::

    from utils.level2 import LEVEL2

    MY_RESULT = LEVEL2.register("my_stage/result", axes=("F", "S"), dtype="float32", unit="K",
                                description="what it holds")
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterator, Mapping
from typing import Any

__all__ = ["AXIS_NAMES", "DatasetPath", "Layout", "LayoutError"]

#: Axis letters used in ``DatasetPath.axes`` and in the generated format documentation.
AXIS_NAMES: dict[str, str] = {
    "F": "science feeds on the level-2 feed axis (``spectrometer/feeds``)",
    "F1": "feeds on the level-1 feed axis (``spectrometer/feeds`` of level 1, ground feed included)",
    "B": "spectrometer bands",
    "C": "channels per band",
    "K": "frequency bins per band after binning",
    "S": "scans",
    "E": "vane events",
    "N": "time samples of the spectrometer",
    "H": "housekeeping samples of the group's own clock",
    "P": "per-scan fit parameters",
    "2": "[start, stop) pair",
    "3": "(sigma_red, alpha, f_ref)",
}


class LayoutError(KeyError):
    """An unknown entry, or a path registered twice with different content."""


class DatasetPath(str):
    """A dataset or group path in one kind of file, with its layout description.

    Parameters
    ----------
    path : str
        Path inside the file (no leading ``/``); may contain ``{field}`` placeholders.
    file : str
        ``'level1'`` or ``'level2'`` (the layout it belongs to).
    axes : tuple of str
        Axis letters (see :data:`AXIS_NAMES`), ``()`` for groups and scalars.
    dtype : str or None
        Numpy dtype name; None for groups.
    unit : str
        Physical unit ('' when dimensionless or not applicable).
    description : str
        One line on what it holds.
    kind : {'dataset', 'group', 'attributes'}
    optional : bool
        True if a valid file may lack it (e.g. weather housekeeping).
    """

    file: str
    axes: tuple[str, ...]
    dtype: str | None
    unit: str
    description: str
    kind: str
    optional: bool

    def __new__(
        cls,
        path: str,
        *,
        file: str,
        axes: tuple[str, ...] = (),
        dtype: str | None = None,
        unit: str = "",
        description: str = "",
        kind: str = "dataset",
        optional: bool = False,
    ) -> DatasetPath:
        if path.startswith("/") or path.endswith("/"):
            raise ValueError(f"layout path {path!r} must not start or end with '/'")
        if kind not in ("dataset", "group", "attributes"):
            raise ValueError(f"kind must be 'dataset', 'group' or 'attributes', got {kind!r}")
        obj = super().__new__(cls, path)
        obj.file = file
        obj.axes = tuple(axes)
        obj.dtype = dtype
        obj.unit = unit
        obj.description = description
        obj.kind = kind
        obj.optional = optional
        return obj

    def __reduce__(self) -> tuple[Any, ...]:
        # Entries travel to worker processes as plain strings: the registry is rebuilt on import.
        return (str, (str(self),))

    @property
    def fields(self) -> tuple[str, ...]:
        """Names of the ``{placeholders}`` in the path (empty for a fixed path)."""
        return tuple(f for _, f, _, _ in string.Formatter().parse(self) if f)

    @property
    def is_template(self) -> bool:
        return bool(self.fields)

    def resolve(self, values: Mapping[str, Any] | None = None, **kwargs: Any) -> str:
        """The concrete path with placeholders filled from ``values`` and ``kwargs``.

        Raises
        ------
        LayoutError
            If a placeholder has no value.
        """
        merged = {**(values or {}), **kwargs}
        missing = [f for f in self.fields if f not in merged]
        if missing:
            raise LayoutError(f"{self!s}: no value for {', '.join(missing)}")
        return str(self).format(**{f: merged[f] for f in self.fields})

    def child(self, name: str) -> str:
        """``self + '/' + name`` as a plain path (for members of a group that are not listed)."""
        return f"{self}/{name}"

    def _pattern(self) -> str:
        return "".join(
            re.escape(lit) + ("[^/]+" if f else "") for lit, f, _, _ in string.Formatter().parse(self)
        )

    def matches(self, path: str) -> bool:
        """True if ``path`` is this entry (a template matches any filled or templated form)."""
        return re.fullmatch(self._pattern(), str(path)) is not None

    def covers(self, other: str) -> bool:
        """True if writing ``self`` provides ``other``: the same entry, or ``other`` lies inside it."""
        return self.matches(other) or re.match(self._pattern() + "/", str(other)) is not None


class Layout:
    """The registered entries of one kind of file.

    Parameters
    ----------
    file : str
        ``'level1'`` or ``'level2'``.
    title : str
        Heading used by the generated format documentation.
    """

    def __init__(self, file: str, title: str) -> None:
        self.file = file
        self.title = title
        self._entries: dict[str, DatasetPath] = {}

    def register(self, path: str, **meta: Any) -> DatasetPath:
        """Add an entry (idempotent for identical content) and return it.

        Raises
        ------
        LayoutError
            If ``path`` is already registered with a different description.
        """
        entry = DatasetPath(path, file=self.file, **meta)
        old = self._entries.get(path)
        if old is not None:
            if _content(old) != _content(entry):
                raise LayoutError(f"{self.file} path {path!r} is already registered differently")
            return old
        self._entries[path] = entry
        return entry

    def register_many(
        self, parent: str, rows: tuple[tuple[Any, ...], ...], **common: Any
    ) -> tuple[DatasetPath, ...]:
        """Register ``parent/name`` for each ``(name, unit, description[, changes])`` row.

        ``common`` holds the keywords the rows share (``axes``, ``dtype``, ...); an optional fourth
        item of a row is a dict that overrides them for that row. Returns the entries in row order.
        """
        return tuple(
            self.register(
                f"{parent}/{row[0]}",
                **{**common, "unit": row[1], "description": row[2], **(row[3] if len(row) > 3 else {})},
            )
            for row in rows
        )

    def adopt(self, entry: DatasetPath, **changes: Any) -> DatasetPath:
        """Register a copy of another layout's ``entry`` (same path and description unless changed)."""
        meta = {
            "axes": entry.axes,
            "dtype": entry.dtype,
            "unit": entry.unit,
            "description": entry.description,
            "kind": entry.kind,
            "optional": entry.optional,
        }
        return self.register(str(entry), **{**meta, **changes})

    def __getitem__(self, path: str) -> DatasetPath:
        try:
            return self._entries[str(path)]
        except KeyError:
            for e in self._entries.values():
                if e.is_template and e.matches(str(path)):
                    return e
            raise LayoutError(f"{path!r} is not a registered {self.file} path") from None

    def __contains__(self, path: object) -> bool:
        try:
            self[str(path)]
        except LayoutError:
            return False
        return True

    def __iter__(self) -> Iterator[DatasetPath]:
        return iter(sorted(self._entries.values(), key=str))

    def __len__(self) -> int:
        return len(self._entries)


def _content(e: DatasetPath) -> tuple[Any, ...]:
    return (str(e), e.file, e.axes, e.dtype, e.unit, e.description, e.kind, e.optional)
