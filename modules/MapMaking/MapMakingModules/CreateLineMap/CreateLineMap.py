"""CreateLineMap: radio-recombination-line cubes of a selection of observations (04 §9)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modules.pipeline_control.Pipeline import MapJob
from modules.pipeline_control.provenance import sha256_of
from utils.constants import BAND_EDGES_GHZ

log = logging.getLogger("comap.CreateLineMap")

SPECTRAL_AXES = ("VRAD", "FREQ")
# Line names tried when a cube is given by frequency only (labels such as H59a instead of a number).
_KNOWN_SPECIES = ("H", "He", "C")
_LABEL_TOLERANCE_GHZ = 5e-4


@dataclass
class CubeSpec:
    """One concrete cube: its label, lines and output file."""

    label: str
    lines: tuple[Any, ...]  # LineSpec
    output_path: Path


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def identify_line(rest_freq_ghz: float) -> str:
    """The name of the recombination line at ``rest_freq_ghz`` (within 0.5 MHz), else e.g. ``31.22332GHz``."""
    from utils.rrl import line_name, rrl_frequency_ghz

    for species in _KNOWN_SPECIES:
        for dn in (1, 2, 3):
            n = np.arange(20, 200)
            f = rrl_frequency_ghz(n, dn, species)
            k = int(np.argmin(np.abs(f - rest_freq_ghz)))
            if abs(float(f[k]) - rest_freq_ghz) <= _LABEL_TOLERANCE_GHZ:
                return line_name(species, int(n[k]), dn)
    return f"{rest_freq_ghz:.5f}GHz"


class CreateLineMap(MapJob):
    """Radio-recombination-line (RRL) cubes of a selection: one per line, or a stack of several (04 §9).

    Each cube is a FITS file ``{output_dir}/{map_name}_{linelabel}.fits`` with LINE, RMS, HITS,
    CONTINUUM and MASK HDUs on an LSRK radio-velocity (VRAD) or frequency (FREQ) axis.

    Parameters
    ----------
    line_frequency : float or list of float
        Rest frequency (GHz); a list stacks several lines. Ignored when ``lines`` is given.
    lines : list of str, optional
        Line names instead of frequencies, e.g. ``['H58a', 'H59a', 'H60a', 'H61a', 'H62a']``.
    stack_lines : bool
        Several lines → one stacked cube (inverse-variance mean in velocity); False → one cube each.
    map_name, output_dir : str
        Output prefix and directory.
    source, source_group, feeds, database_file, obsids, obsid_list_file, min_obsid, max_obsid
        Selection, as CreateMap.
    wcs_def, wcs_def_file, dynamic_wcs_cdelt, dynamic_wcs_padding, dynamic_frame
        2-D geometry, as CreateMap (deg).
    velocity_center_kms, velocity_halfwidth_kms : float
        LSRK radio velocity of the cube centre and the cube half-width (km/s).
    velocity_resolution_kms : float, optional
        Output channel width (km/s); default the native channel width ``c |Δν| / ν0`` (the widest
        of the stacked lines).
    line_mask_kms : [lo, hi]
        Velocities relative to the centre (km/s) excluded from baseline fits.
    baseline_order : int
        Polynomial order in velocity of the continuum baseline.
    continuum_subtraction : {'spectrum', 'pixel', 'none'}
        Per sample before binning (default), per pixel spectrum after binning, or none.
    level_stride : int
        Every ``level_stride``-th sample enters each channel's median level over the scan. 1 (all
        samples) by default: the level's noise is common to every pixel of the scan, so thinning it
        adds a fixed spectral pattern (at 1024 channels, stride 10 gives about 0.009 K per channel,
        more than the white noise of a 60-pixel average of a 4-minute raster).
    quiet_fraction : float, optional
        Take each channel's level from the samples whose line-free continuum is in this lowest
        fraction of the scan (an emission-free reference), instead of the whole scan. Use it when a
        line source fills much of the scan (a raster centred on it): the whole-scan median then
        removes part of the line (23 % of the integrated intensity on ``rrl-fullres``).
    spectral_axis : {'VRAD', 'FREQ'}
        Spectral axis of the FITS cube (FREQ is not allowed for a stack).
    destripe_channels : bool
        Destripe every velocity channel (``offset_length``, ``tol``, ``max_iter``); costs n_v solves
        and keeps every regridded sample in memory (12 bytes × n_v per sample).
    channel_rms_cap_k : float
        Native channels whose white-noise rms (K, after calibration) exceeds this get weight 0.
    sigma_red_cutoff_k, alpha_min : float
        Segment cuts from the binned noise statistics (of ``tod_data_name``) of the bin containing
        the line.
    calibration, calib_source, calib_min_factor, calib_max_factor, missing_calibration
        Calibration factor of the binned channel containing the line, as CreateMap.
    hit_percentile, min_hits : float, int
        Masking, as CreateMap (04 §5.1).
    quicklook : bool
        PNG of the moment-0 map and of the spectrum at the brightest pixel beside each cube.
    overwrite : bool
        Remake cubes even when their configuration hash matches.
    """

    def __init__(
        self,
        line_frequency: float | list = 31.223315,
        lines: list | None = None,
        stack_lines: bool = True,
        map_name: str = "Unknown",
        output_dir: str = "outputs/line_maps",
        source: str | list | None = None,
        source_group: str | list | None = None,
        feeds: list | None = None,
        database_file: str | None = None,
        obsids: list | None = None,
        obsid_list_file: str | None = None,
        min_obsid: int | None = None,
        max_obsid: int | None = None,
        wcs_def: str = "dynamic",
        wcs_def_file: str = "map_making_configs/wcs_definitions.toml",
        dynamic_wcs_cdelt: float = 0.0166667,
        dynamic_wcs_padding: float = 0.5,
        dynamic_frame: str = "galactic",
        velocity_center_kms: float = 0.0,
        velocity_halfwidth_kms: float = 400.0,
        velocity_resolution_kms: float | None = None,
        line_mask_kms: list | tuple = (-150.0, 150.0),
        baseline_order: int = 1,
        continuum_subtraction: str = "spectrum",
        level_stride: int = 1,
        quiet_fraction: float | None = None,
        spectral_axis: str = "VRAD",
        destripe_channels: bool = False,
        offset_length: int = 100,
        tol: float = 1e-6,
        max_iter: int = 1000,
        channel_rms_cap_k: float = 1.0,
        sigma_red_cutoff_k: float = 0.5,
        alpha_min: float | None = None,
        tod_data_name: str = "level2/binned_cleaned_data",
        use_quality_flags: bool = True,
        calibration: str = "model",
        calib_source: str = "TauA",
        calib_min_factor: float = 0.3,
        calib_max_factor: float = 3.0,
        missing_calibration: str = "skip",
        hit_percentile: float = 5.0,
        min_hits: int = 1,
        quicklook: bool = True,
        overwrite: bool = False,
    ) -> None:
        self.line_frequency = line_frequency
        self.lines = lines
        self.stack_lines = stack_lines
        self.map_name = map_name
        self.output_dir = output_dir
        self.source = source
        self.source_group = source_group
        self.feeds = feeds
        self.database_file = database_file
        self.obsids = obsids
        self.obsid_list_file = obsid_list_file
        self.min_obsid = min_obsid
        self.max_obsid = max_obsid
        self.wcs_def = wcs_def
        self.wcs_def_file = wcs_def_file
        self.dynamic_wcs_cdelt = dynamic_wcs_cdelt
        self.dynamic_wcs_padding = dynamic_wcs_padding
        self.dynamic_frame = dynamic_frame
        self.velocity_center_kms = velocity_center_kms
        self.velocity_halfwidth_kms = velocity_halfwidth_kms
        self.velocity_resolution_kms = velocity_resolution_kms
        self.line_mask_kms = line_mask_kms
        self.baseline_order = baseline_order
        self.continuum_subtraction = continuum_subtraction
        self.level_stride = level_stride
        self.quiet_fraction = quiet_fraction
        self.spectral_axis = spectral_axis
        self.destripe_channels = destripe_channels
        self.offset_length = offset_length
        self.tol = tol
        self.max_iter = max_iter
        self.channel_rms_cap_k = channel_rms_cap_k
        self.sigma_red_cutoff_k = sigma_red_cutoff_k
        self.alpha_min = alpha_min
        self.tod_data_name = tod_data_name
        self.use_quality_flags = use_quality_flags
        self.calibration = calibration
        self.calib_source = calib_source
        self.calib_min_factor = calib_min_factor
        self.calib_max_factor = calib_max_factor
        self.missing_calibration = missing_calibration
        self.hit_percentile = hit_percentile
        self.min_hits = min_hits
        self.quicklook = quicklook
        self.overwrite = overwrite

    # --- validation -----------------------------------------------------------------------------
    @classmethod
    def validate_config(cls, params: dict[str, Any]) -> list[str]:
        from modules.MapMaking.MapMakingModules.CreateMap.CreateMap import common_job_problems
        from modules.MapMaking.read_line_data import CONTINUUM_MODES

        problems: list[str] = []
        try:
            specs = cls._line_specs(params.get("lines"), params.get("line_frequency"))
        except ValueError as exc:
            return [str(exc)]
        if not specs:
            problems.append("no line: give line_frequency (GHz) or lines (e.g. ['H59a'])")
        lo, hi = min(e[0] for e in BAND_EDGES_GHZ), max(e[1] for e in BAND_EDGES_GHZ)
        for spec in specs:
            if not lo <= spec.rest_freq_ghz <= hi:
                problems.append(
                    f"line {spec.label} at {spec.rest_freq_ghz:.5f} GHz is outside every band "
                    f"({lo:g}–{hi:g} GHz)"
                )
        if params.get("continuum_subtraction") not in CONTINUUM_MODES:
            problems.append(f"continuum_subtraction must be one of {', '.join(CONTINUUM_MODES)}")
        axis = params.get("spectral_axis")
        if axis not in SPECTRAL_AXES:
            problems.append("spectral_axis must be 'VRAD' or 'FREQ'")
        elif axis == "FREQ" and len(specs) > 1 and params.get("stack_lines", True):
            problems.append("spectral_axis='FREQ' is not allowed when stacking lines (use 'VRAD')")
        mask = params.get("line_mask_kms")
        if not (
            isinstance(mask, list | tuple)
            and len(mask) == 2
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in mask)
            and mask[0] < mask[1]
        ):
            problems.append(f"line_mask_kms must be [lo, hi] with lo < hi (km/s), got {mask!r}")
        halfwidth = params.get("velocity_halfwidth_kms")
        if not (isinstance(halfwidth, int | float) and halfwidth > 0):
            problems.append("velocity_halfwidth_kms must be > 0")
        res = params.get("velocity_resolution_kms")
        if res is not None and not (isinstance(res, int | float) and res > 0):
            problems.append("velocity_resolution_kms must be > 0 or None")
        q = params.get("quiet_fraction")
        if q is not None and not (isinstance(q, int | float) and 0 < q <= 1):
            problems.append("quiet_fraction must be in (0, 1] or None")
        stride = params.get("level_stride")
        if not (isinstance(stride, int) and not isinstance(stride, bool) and stride >= 1):
            problems.append("level_stride must be an integer >= 1")
        order = params.get("baseline_order")
        if not (isinstance(order, int) and not isinstance(order, bool) and order >= 0):
            problems.append("baseline_order must be an integer >= 0")
        problems += common_job_problems(params)
        return problems

    # --- lines and cubes ---------------------------------------------------------------------------
    @staticmethod
    def _line_specs(lines: Any, line_frequency: Any) -> list[Any]:
        from modules.MapMaking.read_line_data import LineSpec
        from utils.rrl import line_frequency_ghz, line_name, parse_line_name

        specs = []
        if lines:
            for name in _as_list(lines):
                species, n, dn = parse_line_name(str(name))
                specs.append(LineSpec(line_name(species, n, dn), line_frequency_ghz(str(name))))
            return specs
        for f in _as_list(line_frequency):
            if isinstance(f, bool) or not isinstance(f, int | float) or not f > 0:
                raise ValueError(f"line_frequency must be a frequency in GHz or a list of them, got {f!r}")
            specs.append(LineSpec(identify_line(float(f)), float(f)))
        return specs

    def line_specs(self) -> list[Any]:
        """The lines of this job, in the order given."""
        return self._line_specs(self.lines, self.line_frequency)

    def expand(self, observations: list[Any] | None = None, selection_feeds: list[int] | None = None):
        """Concrete cubes: one stacked cube, or one per line (04 §9.6 file names)."""
        specs = self.line_specs()
        out = Path(self.output_dir)
        if len(specs) > 1 and self.stack_lines:
            label = f"stack{specs[0].label}-{specs[-1].label}"
            return [CubeSpec(label, tuple(specs), out / f"{self.map_name}_{label}.fits")]
        return [CubeSpec(s.label, (s,), out / f"{self.map_name}_{s.label}.fits") for s in specs]

    def reader_settings(self, cube: CubeSpec, step_kms: float):
        """The reader settings of one cube on a grid of ``step_kms`` channels."""
        from modules.MapMaking.read_line_data import LineReaderSettings, VelocityGrid

        grid = VelocityGrid.build(
            float(self.velocity_center_kms), float(self.velocity_halfwidth_kms), float(step_kms)
        )
        return LineReaderSettings(
            lines=tuple(cube.lines),
            grid=grid,
            halfwidth_kms=float(self.velocity_halfwidth_kms),
            line_mask_kms=(float(self.line_mask_kms[0]), float(self.line_mask_kms[1])),
            baseline_order=int(self.baseline_order),
            continuum_subtraction=str(self.continuum_subtraction),
            channel_rms_cap_k=float(self.channel_rms_cap_k),
            sigma_red_cutoff_k=float(self.sigma_red_cutoff_k),
            alpha_min=None if self.alpha_min is None else float(self.alpha_min),
            feeds=None if self.feeds is None else [int(f) for f in self.feeds],
            use_quality_flags=bool(self.use_quality_flags),
            calibration=str(self.calibration),
            calib_min_factor=float(self.calib_min_factor),
            calib_max_factor=float(self.calib_max_factor),
            missing_calibration=str(self.missing_calibration),
            tod_data_name=str(self.tod_data_name),
            per_sample=bool(self.destripe_channels),
            level_stride=int(self.level_stride),
            quiet_fraction=None if self.quiet_fraction is None else float(self.quiet_fraction),
        )

    def job_config_hash(self, cube: CubeSpec, observations: list[Any], updated: dict[int, str]) -> str:
        """Hash of the resolved parameters, the cube's lines, the obsids and each level-2 file's
        ``updated_utc``: a new or reprocessed observation remakes the cube."""
        ids = sorted(o.obsid for o in observations)
        return sha256_of(
            {
                "params": self.parameters,
                "cube": {"label": cube.label, "lines": [(s.label, s.rest_freq_ghz) for s in cube.lines]},
                "obsids": ids,
                "level2_updated_utc": [updated.get(i, "") for i in ids],
            }
        )

    def run(self, files: list[Any]) -> Any:
        """Make every cube of this job from ``files`` (COMAPData rows) — used standalone; inside a run
        the LineMapMaking stage drives the jobs."""
        from modules.MapMaking.MapMaking import LineMapMaking

        return LineMapMaking().run_line_job(self, files)


__all__ = ["CreateLineMap", "CubeSpec", "identify_line"]
