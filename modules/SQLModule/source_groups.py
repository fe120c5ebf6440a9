"""Source → source-group classification (docs/database.md#source-group-classification).

``classify(source_attr, comment)`` turns the level-1 ``/comap.source`` and ``/comap.comment``
attributes into the ``(source, source_group)`` pair stored in ``comap_data``.

Rules are evaluated in order, case-insensitively, on whole tokens; the first match wins:

1. ``comment`` contains ``sky nod``/``sky dip`` (``\\bsky[\\s_-]*(nod|dip)\\b``), or ``source`` is
   ``SkyDip`` (``^sky[\\s_-]*dip$``) → ``SkyDip``
2. ``source`` is a calibrator (TauA, CasA, CygA, Jupiter, Venus, Mars, Saturn, Moon) → ``Calibrator``
3. ``source`` matches ``^co\\d+[a-z]*$`` → ``CO``
4. ``source`` matches ``^g?field\\d*[a-z]*$`` → ``Galactic``
5. ``source`` matches ``^fg\\d+[a-z]*$`` → ``Foreground``
6. otherwise → ``Other``

**Deliberate difference:** the legacy substring rules put anything containing "co" into CO (e.g.
"Cosmos" or "NGC_Cocoon"); here patterns must match the whole source token.
"""

from __future__ import annotations

import re

__all__ = ["CALIBRATOR_SOURCES", "SOURCE_GROUPS", "classify", "source_name"]

CALIBRATOR_SOURCES: frozenset[str] = frozenset(
    s.lower() for s in ("TauA", "CasA", "CygA", "Jupiter", "Venus", "Mars", "Saturn", "Moon")
)
"""Calibrator source names, lower case (rule 2)."""

SOURCE_GROUPS: tuple[str, ...] = ("SkyDip", "Calibrator", "CO", "Galactic", "Foreground", "Other")
"""Every group :func:`classify` can return, in rule order."""

_SKYDIP_COMMENT = re.compile(r"\bsky[\s_-]*(nod|dip)\b", re.IGNORECASE)
_SKYDIP_SOURCE = re.compile(r"sky[\s_-]*dip", re.IGNORECASE)
_SOURCE_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"co\d+[a-z]*", re.IGNORECASE), "CO"),
    (re.compile(r"g?field\d*[a-z]*", re.IGNORECASE), "Galactic"),
    (re.compile(r"fg\d+[a-z]*", re.IGNORECASE), "Foreground"),
)


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)


def source_name(source_attr: object) -> str:
    """Return the source name: the first comma-separated token of ``/comap.source``, stripped.

    Parameters
    ----------
    source_attr : str, bytes or None
        The level-1 ``/comap.source`` attribute, e.g. ``"GField30, extra"``.

    Returns
    -------
    str
        The first token, or ``'Unknown'`` if it is empty.
    """
    token = _text(source_attr).split(",", 1)[0].strip()
    return token or "Unknown"


def classify(source_attr: object, comment: object = "") -> tuple[str, str]:
    """Classify an observation into ``(source, source_group)`` (docs/database.md#source-group-classification).

    Parameters
    ----------
    source_attr : str, bytes or None
        The level-1 ``/comap.source`` attribute (comma-separated target list).
    comment : str, bytes or None
        The level-1 ``/comap.comment`` attribute (observer comment, may be empty).

    Returns
    -------
    tuple of (str, str)
        ``source`` (first token of ``source_attr`` or ``'Unknown'``) and its group, one of
        :data:`SOURCE_GROUPS`.

    Examples
    --------
    >>> classify("TauA", "")
    ('TauA', 'Calibrator')
    >>> classify("TauA", "Sky Nod")
    ('TauA', 'SkyDip')
    >>> classify("Cosmos", "")
    ('Cosmos', 'Other')
    """
    source = source_name(source_attr)
    if _SKYDIP_COMMENT.search(_text(comment)) or _SKYDIP_SOURCE.fullmatch(source):
        return source, "SkyDip"
    if source.lower() in CALIBRATOR_SOURCES:
        return source, "Calibrator"
    for pattern, group in _SOURCE_RULES:
        if pattern.fullmatch(source):
            return source, group
    return source, "Other"
