"""Observation and archive specifications (docs/simulator.md#interfaces): dataclasses with the spec defaults,
TOML I/O.

Every default of 02 is a field default here. ``ObservationSpec.from_dict`` accepts the nested TOML
layout::

    obsid = 60004
    source = "GField30"
    hour_angle_h = -2.5
    feeds = [1, 2, 3, 20]
    n_channels = 128
    [scan]
    kind = "ces"
    [sky]
    kind = "galactic"
    [[sky.hii_regions]]
    dl_deg = 0.0
    ...
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from utils.constants import GROUND_FEED, MAX_FEED, MIN_FEED
from utils.errors import SimulatorError

from .calibrator_truth import canonical_name, is_calibrator
from .component_spec import NaNBurst, SkyComponent, burst_problems, component_problems

SCAN_KINDS: tuple[str, ...] = ("ces", "lissajous", "raster", "skydip", "stare")
SKY_KINDS: tuple[str, ...] = ("galactic", "taua", "casa", "cyga", "jupiter", "none")
CALIBRATOR_SKY_KINDS: tuple[str, ...] = ("taua", "casa", "cyga", "jupiter")

# Kind-dependent scan defaults (docs/simulator.md#scan-strategies-and-timeline). Fields left as None in
# ScanSpec take these values.
_SCAN_DEFAULTS: dict[str, dict[str, Any]] = {
    "ces": {"n_segments": 2, "segment_s": 120.0, "speed_deg_s": 1.0},
    "lissajous": {"n_segments": 1, "duration_s": 150.0},
    "raster": {"n_segments": 1, "duration_s": 150.0, "speed_deg_s": 0.5},
    "skydip": {"n_segments": 1, "speed_deg_s": 0.5},
    "stare": {"n_segments": 1, "duration_s": 60.0},
}


@dataclass
class ScanSpec:
    """Scan strategy (docs/simulator.md#scan-strategies-and-timeline). ``None`` fields take the kind's default
    (see :meth:`resolved`)."""

    kind: str = "ces"
    n_segments: int | None = None
    """Number of scan segments (CES default 2, others 1), separated by ``repoint_s``."""
    segment_s: float | None = None
    """CES segment length, s (default 120)."""
    duration_s: float | None = None
    """Length of one Lissajous/raster/stare segment, s (150/150/60). Sky dips derive theirs."""
    repoint_s: float = 5.0
    throw_deg: float = 1.5
    """CES half-width on the sky, deg."""
    speed_deg_s: float | None = None
    """On-sky speed: CES 1.0, raster 0.5, sky-dip elevation rate 0.5 (deg/s)."""
    accel_deg_s2: float = 1.5
    """CES turnaround acceleration in azimuth, deg/s²."""
    amplitude_deg: float = 0.5
    """Lissajous amplitude on each axis, deg."""
    period_x_s: float = 13.0
    period_y_s: float = 17.0
    """Lissajous periods in azimuth and elevation, s."""
    n_rows: int = 15
    step_arcmin: float = 4.0
    """Raster: number of rows and their spacing, arcmin."""
    half_width_deg: float = 0.5
    """Raster row half-length on the sky, deg."""
    el_high_deg: float = 65.0
    el_low_deg: float = 35.0
    az_deg: float = 180.0
    """Sky-dip azimuth, deg."""

    def resolved(self) -> ScanSpec:
        """Copy with the kind's defaults filled in."""
        if self.kind not in SCAN_KINDS:
            raise SimulatorError(f"unknown scan kind {self.kind!r}; expected one of {', '.join(SCAN_KINDS)}")
        out = dataclasses.replace(self)
        for key, value in _SCAN_DEFAULTS[self.kind].items():
            if getattr(out, key) is None:
                setattr(out, key, value)
        if out.n_segments is None:
            out.n_segments = 1
        if out.kind == "skydip":
            out.duration_s = 2.0 * (out.el_high_deg - out.el_low_deg) / out.speed_deg_s
        elif out.kind == "ces":
            out.duration_s = out.segment_s
        return out


@dataclass
class HIIRegion:
    """A compact HII region of the Galactic field (docs/simulator.md#galactic-field), offsets relative to (l0,
    b0)."""

    dl_deg: float = 0.0
    db_deg: float = 0.0
    fwhm_arcmin: float = 4.0
    t_peak_30ghz_k: float = 6.0
    beta: float = -2.1
    line_ratio: float = 0.15
    v_lsr_kms: float = 95.0
    line_fwhm_kms: float = 25.0


def default_hii_regions() -> list[HIIRegion]:
    """The three demo HII regions of docs/simulator.md#galactic-field."""
    return [
        HIIRegion(0.00, 0.00, 4.0, 6.0, -2.1, 0.15, 95.0, 25.0),
        HIIRegion(0.35, -0.10, 3.0, 2.0, -2.1, 0.15, 60.0, 25.0),
        HIIRegion(-0.40, 0.15, 6.0, 1.5, -2.1, 0.15, -20.0, 25.0),
    ]


@dataclass
class SkySpec:
    """Sky model (docs/simulator.md#sky-models)."""

    kind: str = "galactic"
    source_fwhm_arcmin: float = 0.0
    """Calibrators: intrinsic Gaussian FWHM added in quadrature to the beam (0 = point source)."""
    l0_deg: float = 30.0
    b0_deg: float = 0.0
    t_ridge_k: float = 0.5
    ridge_fwhm_deg: float = 0.6
    ridge_b_off_deg: float = 0.0
    ridge_modulation: float = 0.3
    ridge_lambda_deg: float = 1.5
    ridge_beta: float = -2.1
    hii_regions: list[HIIRegion] = field(default_factory=default_hii_regions)
    rrl_species: str = "H"
    rrl_dn: int = 1
    rrl_n_min: int = 58
    rrl_n_max: int = 62
    base_scale: float = 1.0
    """Multiplies the emission of the sky model above (field or calibrator) in the TOD and the truth
    map; 0 keeps its pointing, vane placement and truth metadata but removes its signal
    (docs/simulator.md#noise-twins)."""
    components: list[SkyComponent] = field(default_factory=list)
    """Added sky components (docs/simulator.md#added-sky-components), on top of any ``kind``."""

    @property
    def is_calibrator(self) -> bool:
        return self.kind in CALIBRATOR_SKY_KINDS

    @property
    def calibrator_name(self) -> str:
        """Canonical calibrator name (``TauA``…) for calibrator kinds."""
        return canonical_name(self.kind)


@dataclass
class ObservationSpec:
    """Everything needed to simulate one level-1 file (docs/simulator.md). Field defaults are the documented
    defaults."""

    obsid: int = 60001
    source: str = ""
    """``/comap.source``; default from the sky/scan (TauA, GField30, SkyDip, …)."""
    comment: str = ""
    """``/comap.comment``; sky dips default to ``sky nod``."""
    date: str = "2026-03-01"
    start_utc: str = "auto"
    """``'auto'`` (use ``hour_angle_h`` on ``date``) or ``'YYYY-MM-DDTHH:MM:SS'`` (UTC)."""
    hour_angle_h: float = 0.0
    target: str = ""
    """Pointing target: a calibrator name; default from the sky model (field centre / calibrator)."""
    target_ra_deg: float | None = None
    target_dec_deg: float | None = None
    feeds: list[int] = field(default_factory=lambda: [1, 2, 3, GROUND_FEED])
    """Level-1 feed axis in file order; include ``GROUND_FEED`` (20) for the capped feed."""
    n_channels: int = 1024
    sample_rate_hz: float = 50.0
    hk_rate_hz: float = 10.0
    weather_rate_hz: float = 1.0
    time_chunk: int = 1024
    # noise (docs/simulator.md#signal-model, docs/simulator.md#gain-fluctuations)
    white_noise: bool = True
    gain_fluctuations: bool = True
    sigma_g: float | list[float] = 5.0e-5
    alpha: float | list[float] = -1.5
    f0_hz: float | list[float] = 1.0
    instrument_seed: int | None = None
    # receiver and gain (docs/simulator.md)
    gain_scale: float = 1.0e6
    t_rx_base_k: float = 22.0
    t_rx_slope_k_per_ghz: float = 1.5
    t_rx_edge_k: float = 15.0
    edge_width_ghz: float = 0.05
    t_rx_ripple_k: float = 1.0
    ripple_period_ghz: float = 0.25
    t_rx_band_offsets_k: list[float] = field(default_factory=lambda: [0.0, 3.0, -2.0, 2.0])
    """Receiver temperature added to each band (K, × s_f): the bands' separate IF chains
    (docs/simulator.md#receiver-temperature). Without it T_rx is almost linear in frequency across
    26–34 GHz, which makes a gain change indistinguishable from a sky brightness change with a
    linear spectrum (the gain filter's level and slope templates); real receivers' bands differ by
    a few K."""
    ground_load_k: float = 290.0
    # atmosphere and CMB
    atm_zenith_k: float = 10.0
    atm_slope_per_ghz: float = 0.05
    t_cmb_k: float = 2.725
    # optics
    beam_fwhm_arcmin_30ghz: float = 4.5
    feed_spacing_arcmin: float = 12.0
    n_beam_freqs: int = 16
    # vane (docs/simulator.md#vane-events)
    vane_at_start: bool = True
    vane_at_end: bool = True
    vane_park_deg: float = 270.0
    vane_in_deg: float = 40.0
    """Vane angle parked (out of the beam) and in the beam, deg."""
    vane_speed_deg_s: float = 40.0
    vane_dwell_s: float = 5.0
    vane_guard_s: float = 3.0
    """Time on the load and the margin before and after each vane move, s."""
    vane_offset_deg: float = 1.0
    """Pointing offset of the vane position from the field, deg (azimuth)."""
    tshroud_c: float = 15.0
    tshroud_drift_c: float = 0.05
    """Shroud (hot-load) temperature and its drift over the observation, °C."""
    # timeline (docs/simulator.md#scan-strategies-and-timeline)
    slew_s: float = 5.0
    el_min_deg: float = 25.0
    el_max_deg: float = 80.0
    scan: ScanSpec = field(default_factory=ScanSpec)
    sky: SkySpec = field(default_factory=SkySpec)
    nan_bursts: list[NaNBurst] = field(default_factory=list)
    """Spans of NaN channels in the level-1 TOD (docs/simulator.md#nan-bursts)."""

    # ------------------------------------------------------------------------------------------
    @property
    def science_feeds(self) -> list[int]:
        return [f for f in self.feeds if f != GROUND_FEED]

    def resolved_source(self) -> str:
        if self.source:
            return self.source
        if self.sky.is_calibrator:
            return self.sky.calibrator_name
        if self.sky.kind == "galactic":
            return (
                "GField30"
                if (self.sky.l0_deg, self.sky.b0_deg) == (30.0, 0.0)
                else (f"GField{self.sky.l0_deg:g}")
            )
        return "SkyDip" if self.scan.kind == "skydip" else "Blank"

    def resolved_comment(self) -> str:
        if self.comment:
            return self.comment
        return "sky nod" if self.scan.kind == "skydip" else ""

    def per_feed(self, name: str) -> list[float]:
        """Per-feed values (level-1 feed order) of ``sigma_g``, ``alpha`` or ``f0_hz``.

        A scalar applies to every feed. A list aligned with :attr:`science_feeds` gives science
        feeds their own values and the ground feed the first entry; a list aligned with
        :attr:`feeds` is used as is.
        """
        value = getattr(self, name)
        if not isinstance(value, list | tuple):
            return [float(value)] * len(self.feeds)
        vals = [float(v) for v in value]
        if len(vals) == len(self.feeds):
            return vals
        if len(vals) == len(self.science_feeds):
            it = iter(vals)
            return [vals[0] if f == GROUND_FEED else next(it) for f in self.feeds]
        raise SimulatorError(
            f"{name} has {len(vals)} entries; expected 1, {len(self.science_feeds)} "
            f"(science feeds) or {len(self.feeds)} (all feeds)"
        )

    def validate(self) -> ObservationSpec:
        """Check the specification; raise :class:`SimulatorError` with one line per problem."""
        problems: list[str] = []
        feeds = list(self.feeds)
        if len(set(feeds)) != len(feeds) or any(not MIN_FEED <= int(f) <= MAX_FEED for f in feeds):
            problems.append(f"feeds must be unique integers in {MIN_FEED}–{MAX_FEED}, got {feeds}")
        if not self.science_feeds:
            problems.append("feeds must contain at least one science feed")
        if self.n_channels < 8 or self.n_channels % 2:
            problems.append(f"n_channels must be an even number >= 8, got {self.n_channels}")
        for name in (
            "sample_rate_hz",
            "hk_rate_hz",
            "weather_rate_hz",
            "gain_scale",
            "slew_s",
            "vane_speed_deg_s",
            "beam_fwhm_arcmin_30ghz",
        ):
            if not getattr(self, name) > 0:
                problems.append(f"{name} must be > 0, got {getattr(self, name)}")
        if self.time_chunk < 1:
            problems.append(f"time_chunk must be >= 1, got {self.time_chunk}")
        if self.n_beam_freqs < 2:
            problems.append(f"n_beam_freqs must be >= 2, got {self.n_beam_freqs}")
        if self.sky.kind not in SKY_KINDS:
            problems.append(f"unknown sky kind {self.sky.kind!r}; expected one of {', '.join(SKY_KINDS)}")
        if self.scan.kind not in SCAN_KINDS:
            problems.append(f"unknown scan kind {self.scan.kind!r}; expected one of {', '.join(SCAN_KINDS)}")
        if self.target and not is_calibrator(self.target):
            problems.append(f"target {self.target!r} is not a calibrator (TauA, CasA, CygA, Jupiter)")
        if (self.target_ra_deg is None) != (self.target_dec_deg is None):
            problems.append("target_ra_deg and target_dec_deg must be given together")
        if self.start_utc != "auto":
            try:
                _parse_utc(self.start_utc)
            except ValueError:
                problems.append(f"start_utc {self.start_utc!r} must be 'auto' or YYYY-MM-DDTHH:MM:SS")
        if not self.vane_in_deg < 170.0 < 180.0 < self.vane_park_deg:
            problems.append("vane angles must satisfy vane_in_deg < 170 < 180 < vane_park_deg")
        for name in ("sigma_g", "alpha", "f0_hz"):
            try:
                self.per_feed(name)
            except SimulatorError as exc:
                problems.append(str(exc))
        if not math.isfinite(float(self.sky.base_scale)):
            problems.append(f"sky.base_scale must be finite, got {self.sky.base_scale!r}")
        has_target = not (
            self.scan.kind == "skydip"
            and self.target_ra_deg is None
            and not self.target
            and not self.sky.is_calibrator
        )
        problems += component_problems(self.sky.components, has_target=has_target)
        problems += burst_problems(
            self.nan_bursts,
            components=self.sky.components,
            feeds=self.feeds,
            has_calibrator=self.sky.is_calibrator,
        )
        if problems:
            raise SimulatorError(f"obsid {self.obsid}: " + "; ".join(problems))
        return self

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ObservationSpec:
        """Build from a (TOML-style) mapping; unknown keys raise :class:`SimulatorError`."""
        data = dict(data)
        scan = _build(ScanSpec, data.pop("scan", {}) or {}, "scan")
        sky_data = dict(data.pop("sky", {}) or {})
        regions = sky_data.pop("hii_regions", None)
        components = sky_data.pop("components", None) or []
        bursts = data.pop("nan_bursts", None) or []
        sky = _build(SkySpec, sky_data, "sky")
        if regions is not None:
            sky.hii_regions = [_build(HIIRegion, r, "sky.hii_regions") for r in regions]
        sky.components = [_build(SkyComponent, c, "sky.components") for c in components]
        obs = _build(cls, data, "observation")
        obs.scan = scan
        obs.sky = sky
        obs.nan_bursts = [_build(NaNBurst, b, "nan_bursts") for b in bursts]
        obs.feeds = [int(f) for f in obs.feeds]
        return obs

    @classmethod
    def from_toml(cls, path: str | Path) -> ObservationSpec:
        """Load from a TOML file (the top-level table, or an ``[observation]`` table)."""
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
        return cls.from_dict(data.get("observation", data))

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (None values dropped) suitable for TOML."""
        return _drop_none(dataclasses.asdict(self))

    def to_toml(self) -> str:
        """TOML text of :meth:`to_dict` (round-trips through :meth:`from_dict`)."""
        return dumps_toml(self.to_dict())

    def replace(self, **changes: Any) -> ObservationSpec:
        """Copy with top-level fields changed (``scan``/``sky`` may be dicts of field changes)."""
        out = dataclasses.replace(self)
        for key, value in changes.items():
            if key in ("scan", "sky") and isinstance(value, Mapping):
                value = dataclasses.replace(getattr(self, key), **value)
            if not hasattr(out, key):
                raise SimulatorError(f"unknown ObservationSpec field {key!r}")
            setattr(out, key, value)
        return out


@dataclass
class ArchiveSpec:
    """A named list of observations (docs/simulator.md#interfaces, docs/simulator.md#presets-and-sizes)."""

    name: str = "custom"
    observations: list[ObservationSpec] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ArchiveSpec:
        """``name``, optional ``[defaults]`` merged under each ``[[observations]]`` entry."""
        defaults = dict(data.get("defaults", {}) or {})
        obs = []
        for entry in data.get("observations", []) or []:
            merged = _deep_merge(defaults, dict(entry))
            obs.append(ObservationSpec.from_dict(merged))
        return cls(name=str(data.get("name", "custom")), observations=obs)

    @classmethod
    def from_toml(cls, path: str | Path) -> ArchiveSpec:
        with open(path, "rb") as fh:
            return cls.from_dict(tomllib.load(fh))

    def to_toml(self) -> str:
        return dumps_toml({"name": self.name, "observations": [o.to_dict() for o in self.observations]})


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def _parse_utc(text: str):
    from datetime import datetime

    return datetime.strptime(text.replace(" ", "T"), "%Y-%m-%dT%H:%M:%S")


def _build(cls, data: Mapping[str, Any], where: str):
    if isinstance(data, cls):
        return dataclasses.replace(data)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise SimulatorError(f"unknown {where} parameter(s): {', '.join(unknown)}")
    return cls(**dict(data))


def _drop_none(value):
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _deep_merge(dict(out[k]), dict(v))
        else:
            out[k] = v
    return out


def _toml_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_scalar(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else json.dumps(key)


def dumps_toml(data: Mapping[str, Any], _prefix: str = "") -> str:
    """Minimal TOML writer for nested dicts, arrays of tables and scalar/list values."""
    lines: list[str] = []
    tables: list[tuple[str, Mapping]] = []
    arrays: list[tuple[str, list]] = []
    for key, value in data.items():
        if value is None:
            continue
        if isinstance(value, Mapping):
            tables.append((key, value))
        elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            arrays.append((key, value))
        else:
            lines.append(f"{_toml_key(key)} = {_toml_scalar(value)}")
    text = "\n".join(lines) + ("\n" if lines else "")
    for key, value in tables:
        name = f"{_prefix}{_toml_key(key)}"
        text += f"\n[{name}]\n" + dumps_toml(value, name + ".")
    for key, items in arrays:
        name = f"{_prefix}{_toml_key(key)}"
        for item in items:
            text += f"\n[[{name}]]\n" + dumps_toml(item, name + ".")
    return text
