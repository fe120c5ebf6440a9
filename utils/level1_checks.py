"""Validation checks C1–C13 of a level-1 file (docs/formats/level1.md#validity-checks), mixed into
:class:`utils.level1.Level1File`.

:class:`Level1Checks` holds ``validate()`` and one method per check. It reads the file only through
the reader's accessors (``file``, ``mjd()``, ``frequency_ghz()``, ``n_tod``, ``_fail`` …), so that a
failing check carries the reader's obsid and the arrays it reads stay cached for later use.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Sequence
from datetime import datetime

import h5py
import numpy as np

from utils.constants import GROUND_FEED, MAX_FEED, MIN_FEED, UTC_START_FORMAT, obsid_from_level1_name
from utils.errors import Level1FormatError
from utils.h5io import one_line, to_python, to_str
from utils.level1_hdf5 import readonly
from utils.level1_layout import (
    FEATURES,
    FEEDS,
    FREQ_MAX_GHZ,
    FREQ_MIN_GHZ,
    FREQUENCY,
    GAP_FACTOR,
    KNOWN_COMAP_ATTRS,
    MJD,
    OPTIONAL_HK,
    PIXEL_AZ,
    PIXEL_EL,
    POINTING_DATASETS,
    REQUIRED_COMAP_ATTRS,
    REQUIRED_DATASETS,
    SCAN_FEATURE_CODES,
    SECONDS_PER_DAY,
    TOD,
    TSAMP_TOLERANCE,
)

log = logging.getLogger("comap.level1")

__all__ = ["Level1Checks"]


def _shape_str(shape: Sequence[int]) -> str:
    return str(tuple(int(s) for s in shape))


class Level1Checks:
    """Checks C1–C13 of docs/formats/level1.md#validity-checks; a mixin of :class:`utils.level1.Level1File`
    (not used on its own)."""

    # ---------------------------------------------------------------------------------- validation
    def validate(self, probe_tod: bool = True, *, check_pointing: bool = True) -> None:
        """Check the file against docs/formats/level1.md#validity-checks (C1–C13, in order); raise on the
        first failure.

        Parameters
        ----------
        probe_tod : bool
            Run C13: read ``tod[i, b, 0, 0]`` and ``tod[i, b, 0, -1]`` for every feed position and
            band (detects truncated or corrupt files without reading whole columns).
        check_pointing : bool
            Read ``pixel_az``/``pixel_el`` (one feed at a time) to warn about NaNs.

        Raises
        ------
        Level1FormatError
            With the one-line message of the first failing check (docs/formats/level1.md#validity-checks).

        Notes
        -----
        Warnings (logger ``comap.level1``): unknown ``/comap`` attributes, a ``/truth`` group, time
        gaps > 1.5 sample intervals, NaN pointing, NaN in the probed TOD elements, an unreadable
        ``nchan``.
        """
        self.open()  # C1, C2
        try:
            self._check_comap()  # C3
            self._check_datasets()  # C4
            self._check_tod_dims()  # C5, C6 (+ nchan)
            self._check_feeds()  # C7
            self._check_mjd()  # C8
            self._check_frequency()  # C9
            self._check_features()  # C10
            self._check_pointing_shapes()  # C11
            self._check_hk()  # C12
            if "truth" in self.file:
                log.warning("%s: /truth group present (simulator file); the pipeline ignores it", self.name)
            if check_pointing:
                self._warn_pointing_nans()
        except Level1FormatError:
            raise
        except (OSError, KeyError, RuntimeError) as exc:
            self._fail(f"cannot read level-1 file {self.path}: {one_line(exc)}")
        if probe_tod:
            self._probe_tod()  # C13
        self.validated = True

    def _check_comap(self) -> None:
        grp = self.file.get("comap")
        attrs = grp.attrs if isinstance(grp, h5py.Group) else {}
        for name in REQUIRED_COMAP_ATTRS:
            if name not in attrs:
                self._fail(f"missing attribute /comap.{name}")
        obsid = to_python(attrs["obsid"])
        if isinstance(obsid, list) and len(obsid) == 1:
            obsid = obsid[0]
        if not isinstance(obsid, int) or isinstance(obsid, bool):
            self._fail(f"bad attribute /comap.obsid {obsid!r} (expected an integer)")
        utc_start = to_str(attrs["utc_start"])
        try:
            datetime.strptime(utc_start, UTC_START_FORMAT)
        except ValueError:
            self._fail(f"bad utc_start '{utc_start}' (expected {UTC_START_FORMAT})")
        named = obsid_from_level1_name(self.name)
        if named is not None and named != obsid:
            self._fail(f"obsid mismatch: file name says {named}, /comap.obsid says {obsid}")
        unknown = sorted(set(attrs) - KNOWN_COMAP_ATTRS)
        if unknown:
            log.warning("%s: unknown /comap attributes: %s", self.name, ", ".join(unknown))

    def _check_datasets(self) -> None:
        for path in REQUIRED_DATASETS:
            if not self._is_dataset(path):
                self._fail(f"missing dataset {path}")
        for group, names in OPTIONAL_HK.items():
            if self.has_group(group):
                for n in names:
                    if not self._is_dataset(f"{group}/{n}"):
                        self._fail(f"missing dataset {group}/{n}")

    def _check_tod_dims(self) -> None:
        f = self.file
        tod = f[TOD]
        if tod.ndim != 4 or tod.dtype.kind != "f" or tod.dtype.itemsize not in (4, 8):
            self._fail(
                "spectrometer/tod must be 4-D float (feeds, bands, channels, samples), "
                f"got shape {_shape_str(tod.shape)} dtype {tod.dtype}"
            )
        expected = tuple(f[FEEDS].shape) + tuple(f[FREQUENCY].shape) + tuple(f[MJD].shape)
        if tuple(tod.shape) != expected:
            self._fail(
                f"spectrometer/tod has shape {_shape_str(tod.shape)} but feeds/frequency/MJD imply "
                f"{_shape_str(expected)}"
            )
        _, n_bands, n_channels, n_tod = tod.shape
        if n_tod < 2 or n_channels < 2 or n_bands < 1:
            self._fail(
                f"spectrometer/tod has shape {_shape_str(tod.shape)} but feeds/frequency/MJD imply "
                f"{_shape_str(expected)}; need n_tod >= 2, n_channels >= 2 and n_bands >= 1"
            )
        attrs = f["comap"].attrs
        if "nchan" in attrs:
            nchan = to_python(attrs["nchan"])
            try:
                nchan_i = operator.index(nchan)
            except TypeError:
                log.warning("%s: /comap.nchan %r is not an integer; ignored", self.name, nchan)
                return
            if nchan_i != n_channels:
                self._fail(f"/comap.nchan is {nchan_i} but spectrometer/frequency has {n_channels} channels")

    def _check_feeds(self) -> None:
        ds = self.file[FEEDS]
        if ds.dtype.kind not in "iu":
            self._fail(f"spectrometer/feeds: dtype {ds.dtype} is not an integer type")
        feeds = ds[...].astype(np.int64)
        out = sorted({int(x) for x in feeds if not MIN_FEED <= x <= MAX_FEED})
        if out:
            self._fail(f"spectrometer/feeds: feed numbers outside {MIN_FEED}-{MAX_FEED}: {out}")
        uniq, counts = np.unique(feeds, return_counts=True)
        if (counts > 1).any():
            self._fail(f"spectrometer/feeds: duplicate feed numbers {uniq[counts > 1].tolist()}")
        if not (feeds != GROUND_FEED).any():
            self._fail(f"spectrometer/feeds: no science feed in {feeds.tolist()}")

    def _check_mjd(self) -> None:
        mjd = self.mjd()
        bad = ~np.isfinite(mjd)
        bad[1:] |= ~(np.diff(mjd) > 0)
        if bad.any():
            self._fail(f"spectrometer/MJD not strictly increasing at sample {int(np.argmax(bad))}")
        diffs = np.diff(mjd)
        med = float(np.median(diffs))
        dt = med * SECONDS_PER_DAY
        attrs = self.file["comap"].attrs
        if "tsamp" in attrs:
            tsamp = to_python(attrs["tsamp"])
            try:
                ok = abs(dt - float(tsamp)) <= TSAMP_TOLERANCE * abs(float(tsamp))
            except (TypeError, ValueError):
                ok = False
            if not ok:
                ts = f"{tsamp:.6g}" if isinstance(tsamp, int | float) else repr(tsamp)
                self._fail(f"sample spacing {dt:.4g} s disagrees with tsamp {ts} s")
        gaps = np.flatnonzero(diffs > GAP_FACTOR * med)
        if gaps.size:
            k = int(gaps[np.argmax(diffs[gaps])])
            log.warning(
                "%s: spectrometer/MJD has %d time gap(s) longer than %.1f sample intervals "
                "(largest %.3f s after sample %d)",
                self.name, gaps.size, GAP_FACTOR, diffs[k] * SECONDS_PER_DAY, k,
            )  # fmt: skip

    def _check_frequency(self) -> None:
        freq = self.frequency_ghz()
        ranges: list[tuple[float, float]] = []
        for b, row in enumerate(freq):
            head = f"spectrometer/frequency band {b}:"
            nonfinite = np.flatnonzero(~np.isfinite(row))
            if nonfinite.size:
                self._fail(f"{head} non-finite value at channel {int(nonfinite[0])}")
            outside = np.flatnonzero((row < FREQ_MIN_GHZ) | (row > FREQ_MAX_GHZ))
            if outside.size:
                c = int(outside[0])
                self._fail(
                    f"{head} {row[c]:.6g} GHz at channel {c} is outside "
                    f"[{FREQ_MIN_GHZ:g}, {FREQ_MAX_GHZ:g}] GHz"
                )
            d = np.diff(row)
            sign = np.sign(d[0])
            wrong = np.flatnonzero(np.sign(d) != sign) if sign != 0 else np.array([0])
            if wrong.size:
                self._fail(f"{head} not strictly monotonic at channel {int(wrong[0]) + 1}")
            ranges.append((float(row.min()), float(row.max())))
        for b, (lo, hi) in enumerate(ranges):
            for a in range(b):
                lo_a, hi_a = ranges[a]
                if lo < hi_a and lo_a < hi:
                    self._fail(
                        f"spectrometer/frequency band {b}: range [{lo:.6g}, {hi:.6g}] GHz overlaps band {a} "
                        f"[{lo_a:.6g}, {hi_a:.6g}] GHz"
                    )

    def _check_features(self) -> None:
        ds = self.file[FEATURES]
        n_tod = self.n_tod
        if ds.ndim != 1:
            self._fail(f"spectrometer/features has shape {_shape_str(ds.shape)}, expected ({n_tod},)")
        if ds.shape[0] != n_tod:
            self._fail(f"spectrometer/features has length {ds.shape[0]}, expected {n_tod}")
        if ds.dtype.kind not in "iu":
            self._fail(f"spectrometer/features has dtype {ds.dtype}, expected an integer dtype")

    def _check_pointing_shapes(self) -> None:
        n_feeds, n_tod = self.n_feeds, self.n_tod
        for path in POINTING_DATASETS:
            shape = self.file[path].shape
            if tuple(shape) != (n_feeds, n_tod):
                self._fail(f"{path} has shape {_shape_str(shape)}, expected ({n_feeds}, {n_tod})")

    def _check_hk(self) -> None:
        for group in self.hk_groups():
            grp = self.file[group]
            utc_ds = grp["utc"]
            m = utc_ds.shape[0] if utc_ds.ndim else 0
            for name in sorted(grp):
                if name == "utc" or grp.get(name, getclass=True) is not h5py.Dataset:
                    continue
                ds = grp[name]
                n = ds.shape[0] if ds.ndim else 0
                if n != m or ds.ndim == 0:
                    self._fail(f"{group}: {name} has length {n} but utc has {m}")
            utc = utc_ds[...]
            if utc.ndim != 1 or not np.isfinite(utc).all() or (np.diff(utc) < 0).any():
                self._fail(f"{group}/utc not monotonic")
            self._arrays[f"{group}/utc"] = readonly(np.asarray(utc, dtype=np.float64))

    def _warn_pointing_nans(self) -> None:
        in_scan = np.isin(self.decoded_features(), SCAN_FEATURE_CODES)
        for path in (PIXEL_AZ, PIXEL_EL):
            ds = self.file[path]
            buf = np.empty(self.n_tod, dtype=np.float64)
            n_out = n_in = 0
            for i in range(self.n_feeds):
                ds.read_direct(buf, np.s_[i, :])
                nan = np.isnan(buf)
                if nan.any():
                    n_in += int(np.count_nonzero(nan & in_scan))
                    n_out += int(np.count_nonzero(nan & ~in_scan))
            if n_out or n_in:
                log.warning(
                    "%s: %s has %d NaN value(s) outside scans and %d inside scans",
                    self.name, path, n_out, n_in,
                )  # fmt: skip

    def _probe_tod(self) -> None:
        tod = self._tod_dataset()
        feeds = self.feeds()
        n_feeds, n_bands, _, n_tod = tod.shape
        buf = np.empty(1, dtype=np.float32)
        mspace = h5py.h5s.create_simple((1,))
        n_nan = 0
        with self._count_tod():
            for i in range(n_feeds):
                for b in range(n_bands):
                    for s in (0, n_tod - 1):
                        try:
                            fspace = tod.id.get_space()
                            fspace.select_hyperslab((i, b, 0, s), (1, 1, 1, 1))
                            tod.id.read(mspace, fspace, buf)
                        except Exception as exc:
                            self._fail(
                                f"spectrometer/tod unreadable at feed {int(feeds[i])}: "
                                f"{one_line(exc) or type(exc).__name__}"
                            )
                        n_nan += int(np.isnan(buf[0]))
        if n_nan:
            log.warning(
                "%s: spectrometer/tod has NaN in %d of %d probed elements (handled downstream)",
                self.name, n_nan, 2 * n_feeds * n_bands,
            )  # fmt: skip
