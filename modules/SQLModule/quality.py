"""Quality statistics and flags of the database facade (docs/database.md#quality_flags, docs/database.md#api).

Rows of ``quality_flags`` are created lazily; a missing row means good, with no statistics.
``is_good`` is always ``observer_ok AND pipeline_ok``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from modules.SQLModule.deferred import DeferredWrites, write_op
from modules.SQLModule.models import QUALITY_STAT_COLUMNS, COMAPData, QualityFlag, good_flag_values
from modules.SQLModule.values import _chunks, _clean, _element, _escape_like, _int, _int_list, utcnow
from utils.constants import DEFAULT_SCIENCE_FEEDS, GROUND_FEED


def _parse_pixels(pixels: object) -> list[int] | None:
    """Parse a ``/comap.pixels`` string ("1,2,...,20") into feed numbers, or None if unusable."""
    if pixels is None:
        return None
    text = pixels.decode() if isinstance(pixels, bytes) else str(pixels)
    tokens = [t for t in re.split(r"[,\s]+", text.strip()) if t]
    if not tokens:
        return None
    try:
        feeds = sorted({int(t) for t in tokens})
    except ValueError:
        return None
    return feeds


class QualityWrites(DeferredWrites):
    """Write methods on ``quality_flags`` rows: statistics, observer and pipeline flags."""

    @staticmethod
    def _stats_rows(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for row in rows:
            row = dict(row)
            bad = sorted(set(row) - set(QUALITY_STAT_COLUMNS) - {"obsid", "feed", "band", "channel"})
            if bad:
                raise ValueError(
                    f"quality statistics: unknown column(s) {bad}; allowed {list(QUALITY_STAT_COLUMNS)}"
                )
            try:
                key = _element(row.pop("obsid"), row.pop("feed"), row.pop("band"), row.pop("channel"))
            except KeyError as exc:
                raise ValueError(f"quality statistics row is missing {exc}") from None
            out.append({"obsid": key[0], "feed": key[1], "band": key[2], "channel": key[3], **row})
        return out

    def update_quality_statistics(
        self, obsid: int, feed: int, band: int, channel: int, stats: Mapping[str, Any]
    ) -> int | None:
        """Upsert statistics of one (obsid, feed, band, channel) element.

        Parameters
        ----------
        obsid, feed, band, channel : int
            Element (feed number 1–19, band 0–3, binned channel).
        stats : mapping
            Statistic columns (``filtered_white_noise`` …, ``n_spikes``, ``n_nan_values``,
            ``mean_atm_temp``); NaN is stored as NULL. Flags are not touched.

        Raises
        ------
        ValueError
            Unknown statistic name or invalid element.
        """
        row = self._stats_rows(
            [{**dict(stats), "obsid": obsid, "feed": feed, "band": band, "channel": channel}]
        )[0]
        key = (row.pop("obsid"), row.pop("feed"), row.pop("band"), row.pop("channel"))
        return self._write(self._update_quality_statistics_impl, *key, row)

    @write_op("update_quality_statistics")
    def _update_quality_statistics_impl(
        self, s: Session, obsid: int, feed: int, band: int, channel: int, stats: Mapping[str, Any]
    ) -> int:
        return self._bulk_update_quality_statistics_impl(
            s, [{**dict(stats), "obsid": obsid, "feed": feed, "band": band, "channel": channel}]
        )

    def bulk_update_quality_statistics(self, rows: Iterable[Mapping[str, Any]]) -> int | None:
        """Upsert statistics of many elements in one transaction.

        Parameters
        ----------
        rows : iterable of mapping
            Each with ``obsid, feed, band, channel`` and statistic columns.

        Returns
        -------
        int or None
            Number of rows written (None in deferred mode).
        """
        return self._write(self._bulk_update_quality_statistics_impl, self._stats_rows(rows))

    @write_op("bulk_update_quality_statistics")
    def _bulk_update_quality_statistics_impl(self, s: Session, rows: Iterable[Mapping[str, Any]]) -> int:
        rows = self._stats_rows(rows)
        if not rows:
            return 0
        obsids = sorted({r["obsid"] for r in rows})
        existing = self._load_flags(s, obsids)
        registered = set()
        for chunk in _chunks(obsids):
            registered.update(s.scalars(select(COMAPData.obsid).where(COMAPData.obsid.in_(chunk))))
        missing = sorted(set(obsids) - registered)
        if missing:
            raise self._fail("update_quality_statistics", f"obsid(s) not registered: {missing[:10]}")
        now = utcnow()
        for row in rows:
            key = (row["obsid"], row["feed"], row["band"], row["channel"])
            flag = existing.get(key)
            if flag is None:
                flag = self._new_flag(*key, now)
                s.add(flag)
                existing[key] = flag
            for col in QUALITY_STAT_COLUMNS:
                if col in row:
                    setattr(flag, col, _clean(row[col]))
            flag.updated_utc = now
        return len(rows)

    @staticmethod
    def _new_flag(obsid: int, feed: int, band: int, channel: int, now: datetime) -> QualityFlag:
        return QualityFlag(**good_flag_values(obsid, feed, band, channel, now))

    @staticmethod
    def _load_flags(s: Session, obsids: Sequence[int]) -> dict[tuple[int, int, int, int], QualityFlag]:
        out: dict[tuple[int, int, int, int], QualityFlag] = {}
        for chunk in _chunks(list(obsids)):
            for f in s.scalars(select(QualityFlag).where(QualityFlag.obsid.in_(chunk))):
                out[(f.obsid, f.feed, f.band, f.channel)] = f
        return out

    def set_quality_flags(
        self,
        obsid: int,
        *,
        feeds: Iterable[int] | int | None = None,
        bands: Iterable[int] | int | None = None,
        channels: Iterable[int] | int | None = None,
        default_channels: Iterable[int] | None = None,
        observer_ok: bool | None = None,
        pipeline_ok: bool | None = None,
        comment: str | None = None,
    ) -> int | None:
        """Set flags on a block of elements of one observation, creating missing rows.

        Parameters
        ----------
        obsid : int
            A registered observation.
        feeds : int, iterable of int or None
            Feed numbers. None = all feeds: those of the observation's ``pixels`` attribute,
            else ``DEFAULT_SCIENCE_FEEDS``; never ``GROUND_FEED``.
        bands : int, iterable of int or None
            Bands; None = 0–3.
        channels : int, iterable of int or None
            Binned channels; None = the channels already present for the obsid, else
            ``default_channels``, else ``range(2)``.
        default_channels : iterable of int or None
            See ``channels``.
        observer_ok, pipeline_ok : bool or None
            New values; None leaves the flag unchanged (new rows start True).
        comment : str or None
            New comment; None leaves it unchanged.

        Returns
        -------
        int or None
            Number of rows set (None in deferred mode). ``is_good`` is recomputed as
            ``observer_ok AND pipeline_ok`` on every row touched.
        """
        kwargs = dict(
            feeds=None if feeds is None else _int_list(feeds, "feed"),
            bands=None if bands is None else _int_list(bands, "band"),
            channels=None if channels is None else _int_list(channels, "channel"),
            default_channels=None if default_channels is None else _int_list(default_channels, "channel"),
            observer_ok=None if observer_ok is None else bool(observer_ok),
            pipeline_ok=None if pipeline_ok is None else bool(pipeline_ok),
            comment=None if comment is None else str(comment),
        )
        return self._write(self._set_quality_flags_impl, _int(obsid, "obsid"), **kwargs)

    @write_op("set_quality_flags")
    def _set_quality_flags_impl(
        self,
        s: Session,
        obsid: int,
        *,
        feeds: Iterable[int] | None = None,
        bands: Iterable[int] | None = None,
        channels: Iterable[int] | None = None,
        default_channels: Iterable[int] | None = None,
        observer_ok: bool | None = None,
        pipeline_ok: bool | None = None,
        comment: str | None = None,
    ) -> int:
        obsid = _int(obsid, "obsid")
        obs = self._require_observation(s, obsid, "set_quality_flags")
        existing = self._load_flags(s, [obsid])
        if feeds is None:
            parsed = _parse_pixels(obs.pixels)
            all_feeds = [f for f in (parsed or []) if f != GROUND_FEED and f >= 1]
            feed_list = all_feeds or [f for f in DEFAULT_SCIENCE_FEEDS if f != GROUND_FEED]
        else:
            feed_list = sorted(set(_int_list(feeds, "feed")))
        band_list = list(range(4)) if bands is None else sorted(set(_int_list(bands, "band")))
        if channels is not None:
            chan_list = sorted(set(_int_list(channels, "channel")))
        else:
            present = sorted({k[3] for k in existing})
            if present:
                chan_list = present
            elif default_channels is not None:
                chan_list = sorted(set(_int_list(default_channels, "channel")))
            else:
                chan_list = [0, 1]
        now = utcnow()
        n = 0
        for feed in feed_list:
            for band in band_list:
                for channel in chan_list:
                    key = _element(obsid, feed, band, channel)
                    flag = existing.get(key)
                    if flag is None:
                        flag = self._new_flag(*key, now)
                        s.add(flag)
                        existing[key] = flag
                    if observer_ok is not None:
                        flag.observer_ok = bool(observer_ok)
                    if pipeline_ok is not None:
                        flag.pipeline_ok = bool(pipeline_ok)
                    if comment is not None:
                        flag.comment = str(comment)
                    flag.is_good = bool(flag.observer_ok) and bool(flag.pipeline_ok)
                    flag.updated_utc = now
                    n += 1
        return n

    def reset_observer_flags(
        self, obsids: Iterable[int] | None = None, *, clear_comment_prefix: str | None = "Observer Flag:"
    ) -> int | None:
        """Set ``observer_ok = True`` and recompute ``is_good``; ``pipeline_ok`` is untouched.

        Parameters
        ----------
        obsids : iterable of int or None
            Restrict to these observations; None = all.
        clear_comment_prefix : str or None
            Comments starting with this prefix (the ObserverFlags comments) are cleared too;
            None keeps every comment.

        Returns
        -------
        int or None
            Number of rows changed (None in deferred mode).
        """
        ids = None if obsids is None else _int_list(obsids, "obsid")
        return self._write(self._reset_observer_flags_impl, ids, clear_comment_prefix=clear_comment_prefix)

    @write_op("reset_observer_flags")
    def _reset_observer_flags_impl(
        self,
        s: Session,
        obsids: Iterable[int] | None = None,
        *,
        clear_comment_prefix: str | None = "Observer Flag:",
    ) -> int:
        now = utcnow()
        n = 0
        chunks: list[Sequence[int] | None] = (
            [None] if obsids is None else list(_chunks(_int_list(obsids, "obsid")))
        )
        for chunk in chunks:
            stmt = select(QualityFlag)
            cond = QualityFlag.observer_ok.is_(False)
            if clear_comment_prefix:
                cond = or_(
                    cond, QualityFlag.comment.like(_escape_like(clear_comment_prefix) + "%", escape="\\")
                )
            stmt = stmt.where(cond)
            if chunk is not None:
                stmt = stmt.where(QualityFlag.obsid.in_(chunk))
            for flag in s.scalars(stmt):
                flag.observer_ok = True
                flag.is_good = bool(flag.pipeline_ok)
                if clear_comment_prefix and flag.comment and flag.comment.startswith(clear_comment_prefix):
                    flag.comment = None
                flag.updated_utc = now
                n += 1
        return n
