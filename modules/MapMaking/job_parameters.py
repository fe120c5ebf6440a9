"""Parameter groups shared by the map products (docs/mapmaking.md#orchestration,
docs/mapmaking.md#pre-pass-and-segment-selection, docs/mapmaking.md#name-and-hdus,
docs/mapmaking.md#createmap-and-its-variants, docs/mapmaking.md#rrl-cubes).

Each group is a keyword-only dataclass: a product class lists the groups it takes among its
bases and is itself a dataclass, so its generated ``__init__`` carries every parameter with its
annotation and default in one plain signature (what the config loader reads). A product whose
default differs from the group's redeclares the field with its own default
(``sigma_red_cutoff_k: float = 0.5`` in CreateLineMap); the field keeps its place and meaning.

Single-parameter bounds and choices are in the annotations (``Annotated[..., Range(...)]``,
``Literal[...]``), checked by the config loader. A group with rules an annotation cannot express
(a named geometry that must exist, a list that must not be empty) gives them in a static
``group_rules(params)``; :func:`group_rules` collects those of every group a product takes, and
:meth:`MapProduct.parameter_rules <modules.MapMaking.product.MapProduct.parameter_rules>` returns
them.

This module deliberately does not use ``from __future__ import annotations``: the dataclass
``__init__`` then carries the annotation objects themselves, which the loader resolves without
the defining module's namespace.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from modules.MapMaking.geometry import wcs_def_problems
from modules.pipeline_control.parameters import Range
from utils.level2 import BINNED_CLEANED_DATA

Calibration = Literal["model", "none"]
MissingCalibration = Literal["skip", "unity"]
Frame = Literal["galactic", "icrs"]
NonNegativeInt = Annotated[int, Range(ge=0)]


@dataclass(kw_only=True, eq=False)
class OutputParameters:
    """Where and how a product is written.

    Parameters
    ----------
    map_name : str
        Prefix of the name of every output file of the job.
    output_dir : str
        Directory the job's output files are written to.
    quicklook : bool
        Write a PNG quicklook beside each FITS file.
    overwrite : bool
        Remake outputs even when the configuration hash in their header matches this job's.
    """

    map_name: str = "Unknown"
    output_dir: str = "outputs/maps"
    quicklook: bool = True
    overwrite: bool = False


@dataclass(kw_only=True, eq=False)
class SelectionParameters:
    """Which observations and segments a product takes (docs/mapmaking.md#file-selection,
    docs/mapmaking.md#pre-pass-and-segment-selection).

    Parameters
    ----------
    source : str or list, optional
        Source name(s) whose observations the database query selects (``*`` and ``?`` wildcards,
        case-insensitive); used when no obsid list is given.
    source_group : str or list, optional
        Source group(s) whose observations the database query selects (``*`` and ``?`` wildcards,
        case-insensitive); used when no obsid list is given.
    obsids : list of int, optional
        The obsids of this job; takes the place of ``[Master] obsid_list`` and of the database query
        (intersected with ``--obsid`` if given).
    obsid_list_file : str, optional
        Text file of the obsids of this job, one per line (``#`` starts a comment); read instead of
        ``obsids`` when both are set.
    min_obsid : int, optional
        Lowest obsid (inclusive) of the database query; overrides ``[Master] min_obsid``.
    max_obsid : int, optional
        Highest obsid (inclusive) of the database query; overrides ``[Master] max_obsid``.
    database_file : str, optional
        Another database (opened read-only) for this job's selection, flags and calibration.
    tod_data_name : str
        Level-2 dataset read, shape (feed, band, channel, sample); its per-segment noise statistics
        come from the NoiseStatsLevel2 group of the same basename.
    feeds : list of int, optional
        Feed numbers used; None = every feed of each level-2 file.
    use_quality_flags : bool
        Drop the (feed, band, channel) of an observation flagged bad in the database; an
        observation without quality-flag rows counts as good.
    sigma_red_cutoff_k : float
        Segments (one scan of one feed) whose fitted red-noise amplitude σ_red (K, the 1/f
        amplitude at the NoiseStatsLevel2 reference frequency) in the level-2 noise statistics of
        ``tod_data_name`` exceeds this are dropped; NaN passes.
    """

    source: str | list | None = None
    source_group: str | list | None = None
    obsids: list | None = None
    obsid_list_file: str | None = None
    min_obsid: int | None = None
    max_obsid: int | None = None
    database_file: str | None = None
    tod_data_name: str = str(BINNED_CLEANED_DATA)
    feeds: list | None = None
    use_quality_flags: bool = True
    sigma_red_cutoff_k: float = 0.4


@dataclass(kw_only=True, eq=False)
class CalibrationParameters:
    """Calibration factors from CalibrationModel (``'model'``) or none.

    Parameters
    ----------
    calibration : {'model', 'none'}
        ``'model'``: divide each segment by the CalibrationModel factor of its (feed, band,
        channel) at the scan's mid-time, from vane K to K_RJ; ``'none'``: no factor (data stay in
        vane K) and no calibration cut.
    calib_source : str
        Calibrator (TauA, CasA, CygA or Jupiter) whose CalibrationModel fit gives the factors.
    calib_min_factor, calib_max_factor : float
        Accepted range [calib_min_factor, calib_max_factor] of a segment's calibration factor
        (dimensionless); a segment whose factor is outside it is dropped.
    missing_calibration : {'skip', 'unity'}
        A segment without a finite calibration factor is dropped (``'skip'``) or taken with
        factor 1 (``'unity'``).
    """

    calibration: Calibration = "model"
    calib_source: str = "TauA"
    calib_min_factor: float = 0.3
    calib_max_factor: float = 3.0
    missing_calibration: MissingCalibration = "skip"


@dataclass(kw_only=True, eq=False)
class GeometryParameters:
    """The 2-D map geometry: a named WCS or one fitted to the pointing (docs/mapmaking.md#map-geometry).

    Parameters
    ----------
    wcs_def : str
        Name of a geometry table of ``wcs_def_file`` (e.g. ``'Galactic'``), or ``'dynamic'`` for a
        CAR grid fitted to the pointing of the kept segments.
    wcs_def_file : str
        TOML file of the named geometries; looked up as given, then relative to the working
        directory, then relative to ``modules/MapMaking/``.
    dynamic_wcs_cdelt : float
        Pixel size of the dynamic WCS (deg); the default is 1 arcmin.
    dynamic_wcs_padding : float
        Margin added on each side of the pointing's extent by the dynamic WCS (deg).
    dynamic_frame : {'galactic', 'icrs'}
        Frame of the dynamic WCS: Galactic (l, b) or ICRS (RA, Dec).
    """

    wcs_def: str = "dynamic"
    wcs_def_file: str = "map_making_configs/wcs_definitions.toml"
    dynamic_wcs_cdelt: float = 0.0166667
    dynamic_wcs_padding: float = 0.5
    dynamic_frame: Frame = "galactic"

    @staticmethod
    def group_rules(params: Mapping[str, Any]) -> list[str]:
        return wcs_def_problems(params["wcs_def"], params["wcs_def_file"])


@dataclass(kw_only=True, eq=False)
class DestriperParameters:
    """Destriper settings shared by maps and per-channel cube destriping (docs/mapmaking.md#destriper).

    Parameters
    ----------
    offset_length : int
        Length of each destriper baseline offset (samples); offsets restart at every segment (one
        scan of one feed), whose last offset may be shorter.
    tol : float
        The conjugate-gradient solve stops when its relative residual ``‖r‖/‖b‖`` is below this
        (dimensionless).
    max_iter : int
        Largest number of conjugate-gradient iterations; a solve that reaches it ends with status
        ``max_iter``.
    """

    offset_length: Annotated[int, Range(ge=1)] = 100
    tol: float = 1e-6
    max_iter: int = 1000


@dataclass(kw_only=True, eq=False)
class MaskingParameters:
    """Which pixels are masked (docs/mapmaking.md#name-and-hdus).

    Parameters
    ----------
    hit_percentile : float
        Hit pixels with fewer hits than this percentile (%) of the hit counts of all hit pixels are
        masked (MASK bit 2).
    min_hits : int
        Pixels with fewer hits than this are masked (MASK bit 2): the hit threshold is the larger
        of ``min_hits`` and the ``hit_percentile`` value.
    """

    hit_percentile: float = 5.0
    min_hits: int = 1


@dataclass(kw_only=True, eq=False)
class ChannelParameters:
    """Binned channels of a continuum product and their segment cuts
    (docs/mapmaking.md#pre-pass-and-segment-selection).

    Parameters
    ----------
    band : int or list of int
        Band index 0–3; a list makes one output per band (and per ``channel``).
    channel : int or list of int
        Binned-channel index within the band; a list makes one output per channel (and per
        ``band``).
    auto_rms_cap_k : float
        Segments whose white-noise rms (K, ``auto_rms`` of the level-2 noise statistics) is not
        finite, <= 0 or above this are dropped.
    fknee_max_hz : float, optional
        Segments whose fitted 1/f knee frequency (Hz) is above this are dropped; None = no limit,
        and NaN passes.
    """

    band: NonNegativeInt | list[NonNegativeInt] = 0
    channel: NonNegativeInt | list[NonNegativeInt] = 0
    auto_rms_cap_k: float = 0.1
    fknee_max_hz: float | None = None

    @property
    def bands(self) -> list[int]:
        return list(self.band) if isinstance(self.band, list | tuple) else [int(self.band)]

    @property
    def channels(self) -> list[int]:
        return list(self.channel) if isinstance(self.channel, list | tuple) else [int(self.channel)]

    @staticmethod
    def group_rules(params: Mapping[str, Any]) -> list[str]:
        # The annotation checks each item; an empty list would make no output.
        return [
            f"{key} must be an integer >= 0 or a non-empty list of them, got {params[key]!r}"
            for key in ("band", "channel")
            if isinstance(params[key], list | tuple) and not params[key]
        ]


def group_rules(cls: type, params: Mapping[str, Any]) -> list[str]:
    """The rules of every parameter group among the bases of ``cls``, base groups first."""
    problems: list[str] = []
    for group in reversed(cls.__mro__):
        rules = vars(group).get("group_rules")
        if isinstance(rules, staticmethod):
            problems += rules(params)
    return problems


__all__ = [
    "CalibrationParameters",
    "ChannelParameters",
    "DestriperParameters",
    "GeometryParameters",
    "MaskingParameters",
    "OutputParameters",
    "SelectionParameters",
    "group_rules",
]
