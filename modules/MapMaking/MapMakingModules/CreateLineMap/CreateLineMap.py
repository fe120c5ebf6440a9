"""CreateLineMap: radio-recombination-line cubes of a selection of observations (docs/mapmaking.md#rrl-cubes).

The product's steps: :meth:`CreateLineMap.expand` (one stacked cube, or one per line), then per
cube the pre-pass and read of :mod:`modules.MapMaking.read_line_data` (level-1 channel windows,
files in parallel through its picklable ``_read_line_task``), the cube assembled from the merged
accumulators (:mod:`modules.MapMaking.line_cube`) on the cube's geometry, and the FITS writer.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import h5py
import numpy as np

from modules.MapMaking.common_beam import stack_common_beam
from modules.MapMaking.dispatch import JobInputs, MapJobFailed
from modules.MapMaking.fits_metadata import (
    Beam,
    jy_per_k,
    map_beam,
    product_cards,
    rest_frequency_cards,
    segment_records,
)
from modules.MapMaking.fits_output import MapInfo, SpectralAxis, hit_mask, write_cube_fits
from modules.MapMaking.geometry import geometry_for
from modules.MapMaking.job_parameters import (
    CalibrationParameters,
    DestriperParameters,
    GeometryParameters,
    MaskingParameters,
    OutputParameters,
    SelectionParameters,
)
from modules.MapMaking.line_cube import (
    Cube,
    channel_correlation,
    cube_from_sums,
    cube_quicklook_png,
    destripe_channels,
    line_cards,
    pixel_baselines,
)
from modules.MapMaking.product import MapProduct
from modules.MapMaking.read_data import describe_counts
from modules.MapMaking.read_line_data import (
    ONE_SIDED_NOTE,
    ContinuumMode,
    LineDataReader,
    LineReaderSettings,
    LineSpec,
    VelocityGrid,
)
from modules.pipeline_control.parameters import Range
from utils.constants import BAND_EDGES_GHZ
from utils.level2 import FREQUENCY
from utils.rrl import SPEED_OF_LIGHT_KMS

SpectralAxisName = Literal["VRAD", "FREQ"]
# Line names tried when a cube is given by frequency only (labels such as H59a instead of a number).
_KNOWN_SPECIES = ("H", "He", "C")
_LABEL_TOLERANCE_GHZ = 5e-4


@dataclass
class CubeSpec:
    """One concrete cube: its label, lines and output file."""

    label: str
    lines: tuple[LineSpec, ...]
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


@dataclass(kw_only=True, eq=False)
class CreateLineMap(
    MapProduct,
    OutputParameters,
    SelectionParameters,
    CalibrationParameters,
    GeometryParameters,
    DestriperParameters,
    MaskingParameters,
):
    """Radio-recombination-line (RRL) cubes of a selection: one per line, or a stack of several
    (docs/mapmaking.md#rrl-cubes).

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
    common_beam : bool
        Before stacking, smooth every line to the beam of the lowest-frequency (widest-beam) line, so
        that the stack has one beam (docs/mapmaking.md#common-beam-stacking); False averages the lines
        as observed, a mixture of beams. Not with ``destripe_channels``.
    map_name : str
        Output prefix: ``{output_dir}/{map_name}_{linelabel}.fits``.
    velocity_center_kms : float
        LSRK radio velocity of the cube centre (km/s).
    velocity_halfwidth_kms : float
        Half-width of the cube's velocity range about ``velocity_center_kms`` (km/s).
    velocity_resolution_kms : float, optional
        Output channel width (km/s); default the native channel width ``c |Δν| / ν0`` (the widest
        of the stacked lines), and then the grid centre moves from ``velocity_center_kms`` by less
        than half a channel onto a native channel (median LSRK correction), so that output channels
        are native ones and regridding neither widens the line nor correlates channels.
    line_mask_kms : [lo, hi]
        Velocities relative to ``velocity_center_kms`` (km/s) excluded from baseline fits.
    baseline_order : int
        Polynomial order in velocity of the continuum baseline.
    continuum_subtraction : {'spectrum', 'pixel', 'none'}
        Per sample before binning (default), per pixel spectrum after binning, or none.
    level_stride : int
        Every ``level_stride``-th sample enters each channel's level over the scan. 1 (all
        samples) by default: the level's noise is common to every pixel of the scan, so thinning it
        adds a fixed spectral pattern (at 1024 channels, stride 10 gives about 0.009 K per channel,
        more than the white noise of a 60-pixel average of a 4-minute raster).
    quiet_fraction : float
        Each channel's level comes from the samples whose continuum is in this faintest fraction of
        the scan, chosen on one sample of each pair and measured on the other so that the noise
        that makes a sample look quiet does not bias it (docs/mapmaking.md#channel-levels). 1 is
        the median over the whole scan, which removes part of a line that fills the scan (23 % of
        the integrated intensity on ``rrl-fullres``).
    spectral_axis : {'VRAD', 'FREQ'}
        Spectral axis of the FITS cube (FREQ is not allowed for a stack).
    destripe_channels : bool
        Destripe every velocity channel (``offset_length``, ``tol``, ``max_iter``); costs n_v solves
        and keeps every regridded sample in memory (12 bytes × n_v per sample).
    channel_rms_cap_k : float
        Native channels whose white-noise rms (K, after calibration) exceeds this get weight 0.
    sigma_red_cutoff_k : float
        Segments whose fitted red-noise amplitude σ_red (K) in the level-2 noise statistics of
        ``tod_data_name``, in the binned channel holding the line, exceeds this are dropped; NaN
        passes.
    alpha_min : float, optional
        Segments whose fitted 1/f spectral index α in the level-2 noise statistics of
        ``tod_data_name``, in the binned channel holding the line, is below this are dropped; None
        = no limit.
    calibration : {'model', 'none'}
        ``'model'``: divide by the CalibrationModel factor of the binned channel holding the line
        (after the vane gain); ``'none'``: no factor and no calibration cut.
    quicklook : bool
        PNG of the moment-0 map and of the spectrum at the brightest pixel beside each cube.
    overwrite : bool
        Remake cubes even when their configuration hash matches.
    """

    product = "cube"

    line_frequency: float | list = 31.223315
    lines: list | None = None
    stack_lines: bool = True
    common_beam: bool = True
    output_dir: str = "outputs/line_maps"
    velocity_center_kms: float = 0.0
    velocity_halfwidth_kms: Annotated[float, Range(gt=0)] = 400.0
    velocity_resolution_kms: Annotated[float, Range(gt=0)] | None = None
    line_mask_kms: tuple[float, float] = (-150.0, 150.0)
    baseline_order: Annotated[int, Range(ge=0)] = 1
    continuum_subtraction: ContinuumMode = "spectrum"
    level_stride: Annotated[int, Range(ge=1)] = 1
    quiet_fraction: Annotated[float, Range(gt=0, le=1)] = 0.25
    spectral_axis: SpectralAxisName = "VRAD"
    destripe_channels: bool = False
    channel_rms_cap_k: float = 1.0
    sigma_red_cutoff_k: float = 0.5
    alpha_min: float | None = None

    # --- validation -----------------------------------------------------------------------------
    @classmethod
    def parameter_rules(cls, params: Mapping[str, Any]) -> list[str]:
        problems: list[str] = []
        try:
            specs = cls._line_specs(params["lines"], params["line_frequency"])
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
        if params["spectral_axis"] == "FREQ" and len(specs) > 1 and params["stack_lines"]:
            problems.append("spectral_axis='FREQ' is not allowed when stacking lines (use 'VRAD')")
        if len(specs) > 1 and params["stack_lines"] and params["common_beam"] and params["destripe_channels"]:
            problems.append(
                "common_beam (smoothing each line before stacking) does not work with destripe_channels; "
                "set common_beam = false or destripe_channels = false"
            )
        mask = params["line_mask_kms"]
        if not (
            isinstance(mask, list | tuple)
            and len(mask) == 2
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in mask)
            and mask[0] < mask[1]
        ):
            problems.append(f"line_mask_kms must be [lo, hi] with lo < hi (km/s), got {mask!r}")
        problems += super().parameter_rules(params)
        return problems

    # --- lines and cubes ---------------------------------------------------------------------------
    @staticmethod
    def _line_specs(lines: Any, line_frequency: Any) -> list[Any]:
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
        """Concrete cubes: one stacked cube, or one per line (docs/mapmaking.md#fits-cube file names)."""
        specs = self.line_specs()
        out = Path(self.output_dir)
        if len(specs) > 1 and self.stack_lines:
            label = f"stack{specs[0].label}-{specs[-1].label}"
            return [CubeSpec(label, tuple(specs), out / f"{self.map_name}_{label}.fits")]
        return [CubeSpec(s.label, (s,), out / f"{self.map_name}_{s.label}.fits") for s in specs]

    def reader_settings(self, cube: CubeSpec, step_kms: float, center_kms: float | None = None):
        """The reader settings of one cube on a grid of ``step_kms`` channels centred on ``center_kms``
        (default ``velocity_center_kms``)."""
        center = float(self.velocity_center_kms) if center_kms is None else float(center_kms)
        grid = VelocityGrid.build(center, float(self.velocity_halfwidth_kms), float(step_kms))
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
            quiet_fraction=float(self.quiet_fraction),
            mask_center_kms=float(self.velocity_center_kms),
            per_line=self._smooths(cube),
        )

    def _smooths(self, cube: CubeSpec) -> bool:
        """True if this cube's lines are smoothed to a common beam before stacking."""
        return bool(self.common_beam) and len(cube.lines) > 1 and not bool(self.destripe_channels)

    @staticmethod
    def line_beams(cube: CubeSpec, plans, used, beams) -> list[Beam]:
        """Each line's beam at its rest frequency from the feeds and bands that observed it
        (docs/map_products.md#beam-brightness-and-provenance)."""
        feeds = sorted({f for _o, f, _s in used})
        out = []
        for i, spec in enumerate(cube.lines):
            bands = sorted({u.band for p in plans for u in p.uses if u.line == i}) or [0]
            out.append(map_beam(beams, feeds, bands, spec.rest_freq_ghz))
        return out

    def output_identity(self, output: CubeSpec) -> dict[str, Any]:
        return {"cube": {"label": output.label, "lines": [(s.label, s.rest_freq_ghz) for s in output.lines]}}

    # --- making one cube -------------------------------------------------------------------------
    @staticmethod
    def _native_step_kms(cube: CubeSpec, path: str) -> float:
        """Native channel width ``c |Δν| / ν0`` (km/s) of the widest of the cube's lines."""
        with h5py.File(path, "r", locking=False) as l2:
            freq = np.asarray(l2[FREQUENCY][...], dtype=np.float64)
        width_ghz = float(np.median(np.abs(np.diff(freq, axis=1))))
        return max(SPEED_OF_LIGHT_KMS * width_ghz / s.rest_freq_ghz for s in cube.lines)

    @staticmethod
    def _aligned_center_kms(cube: CubeSpec, plans: list, step_kms: float, center_kms: float) -> float:
        """The grid centre nearest ``center_kms`` on which the native channels of the cube's widest
        line fall (docs/mapmaking.md#velocity-regridding-and-accumulation): ``c (ν0 − ν_k)/ν0 +
        v_corr`` with the median LSRK correction of the segments. Output channels then coincide with
        native ones and the linear deposit does not mix neighbours (exactly for that correction)."""
        widest = max(range(len(cube.lines)), key=lambda i: 1.0 / cube.lines[i].rest_freq_ghz)
        users = [p for p in plans if any(u.line == widest for u in p.uses)] or plans
        band = next((u.band for u in users[0].uses if u.line == widest), users[0].uses[0].band)
        with h5py.File(users[0].path, "r", locking=False) as l2:
            freq = np.asarray(l2[FREQUENCY][band], dtype=np.float64)
        nu0 = cube.lines[widest].rest_freq_ghz
        v_corr = float(np.median([p.v_corr_kms for p in users]))
        v_native = SPEED_OF_LIGHT_KMS * (nu0 - freq[freq.size // 2]) / nu0 + v_corr
        phase = (v_native - center_kms) / step_kms
        return center_kms + (phase - round(phase)) * step_kms

    def make(self, output: CubeSpec, inputs: JobInputs, config_sha: str, executor=None) -> Path:
        """Pre-pass, read, assemble and write one cube (docs/mapmaking.md)."""
        cube, log = output, inputs.log
        name = cube.output_path.name
        reader = LineDataReader(self.reader_settings(cube, 1.0), inputs.table, inputs.flags)
        plans = reader.prepass(inputs.observations)
        if not plans:
            raise MapJobFailed(f"no data for cube {name}: {describe_counts(reader.counts)}")
        center = float(self.velocity_center_kms)
        if self.velocity_resolution_kms is None:
            step = self._native_step_kms(cube, plans[0].path)
            center = self._aligned_center_kms(cube, plans, step, center)
        else:
            step = float(self.velocity_resolution_kms)
        settings = self.reader_settings(cube, float(step), center)
        reader.settings = settings
        grid = settings.grid
        geometry = geometry_for(self, lambda: plans)
        log.info(
            "%s: %d segment(s) from %d observation(s), %d velocity channels of %.2f km/s about %.2f km/s; %s",
            name,
            len(plans),
            len({p.obsid for p in plans}),
            grid.n_v,
            grid.step_kms,
            grid.center_kms,
            describe_counts(reader.counts),
        )
        with inputs.read_progress(len({p.path for p in plans}), name) as bar:
            acc = reader.read(plans, geometry, executor=executor, progress=bar)
        for note in acc.notes:
            if ONE_SIDED_NOTE in note:  # docs/mapmaking.md#masked-channels
                log.warning("%s: %s: the baseline is extrapolated across the line (LINE BASEk)", name, note)
            else:
                log.info("%s: %s", name, note)
        if acc.hit.size == 0 or not (acc.acc_w > 0).any():
            raise MapJobFailed(
                f"no data for cube {name}: no sample with weight lands on the map "
                f"({describe_counts(acc.counts)})"
            )
        line_beams = self.line_beams(cube, plans, acc.used, inputs.beams)
        beam = line_beams[0]
        if acc.acc_sum.ndim == 3:  # one accumulator per line: smooth to the widest beam, then stack
            acc.acc_sum, acc.acc_w, acc.acc_q, common, acc.line_weight = stack_common_beam(
                acc.acc_sum, acc.acc_w, acc.acc_q, acc.hit, geometry, [b.fwhm_deg for b in line_beams]
            )
            widest = max(line_beams, key=lambda b: b.fwhm_deg)
            beam = Beam(common, widest.freq_ghz, "common", sum(b.n_fit for b in line_beams))
            log.info(
                "%s: lines smoothed to a common beam of %.2f arcmin (beams before: %s)",
                name,
                common * 60.0,
                ", ".join(f"{s.label} {b.fwhm_deg * 60:.2f}'" for s, b in zip(cube.lines, line_beams)),
            )
        elif len(cube.lines) > 1:  # stacked as observed: a mixture, the weight-mean FWHM is recorded
            share = acc.line_weight / acc.line_weight.sum() if acc.line_weight is not None else None
            fwhm = float(np.average([b.fwhm_deg for b in line_beams], weights=share))
            beam = Beam(fwhm, cube.lines[0].rest_freq_ghz, "mixed", sum(b.n_fit for b in line_beams))
        line, rms = cube_from_sums(acc)
        with np.errstate(divide="ignore", invalid="ignore"):
            continuum = np.where(acc.cont_w > 0, acc.cont_sum / acc.cont_w, np.nan)
        destriper_cards: dict[str, Any] = {}
        if settings.per_sample:
            line, destriper_cards = destripe_channels(
                acc, settings, offset_length=self.offset_length, tol=self.tol, max_iter=self.max_iter
            )
        if settings.continuum_subtraction == "pixel":
            line, continuum = pixel_baselines(line, acc.acc_w, settings)
        cards = self._header_cards(cube, acc, plans, beam, line_beams, inputs)
        path = self._write(
            cube,
            geometry,
            settings,
            acc,
            plans,
            Cube(line, rms, continuum, cards),
            destriper_cards,
            config_sha,
        )
        log.info("%s: %d samples, %.1f MB of level-1 TOD read", name, acc.n_samples, acc.bytes_read / 1e6)
        if self.quicklook:
            hits_full = np.zeros(geometry.n_pixels, dtype=np.int64)
            hits_full[acc.hit] = acc.hits
            mask, _thr = hit_mask(
                hits_full.reshape(geometry.shape), hit_percentile=self.hit_percentile, min_hits=self.min_hits
            )
            cube_quicklook_png(
                path.with_suffix(".png"),
                geometry,
                acc.hit,
                Cube(line, rms, continuum, cards, correlation=channel_correlation(acc, settings)),
                grid.velocities_kms,
                settings.mask_kms,
                mask.ravel()[acc.hit] != 0,
                f"{self.map_name} {cube.label}",
            )
        return path

    def _header_cards(self, cube: CubeSpec, acc, plans, beam: Beam, line_beams, inputs) -> dict[str, Any]:
        """Beam, brightness scale and rest frequencies
        (docs/map_products.md#beam-brightness-and-provenance)."""
        elements = sorted({(p.feed, u.band, u.bin) for p in plans for u in p.uses})
        first = cube.lines[0]
        cards = product_cards(
            beam,
            first.rest_freq_ghz,
            calibration=str(self.calibration),
            calib_source=str(self.calib_source),
            table=inputs.table,
            elements=elements,
            mjd=0.5 * (acc.mjd_range[0] + acc.mjd_range[1]),
        )
        cards.update(rest_frequency_cards(cube.lines))
        if len(cube.lines) > 1:
            for k, (spec, b) in enumerate(zip(cube.lines, line_beams), start=1):
                cards[f"JYPERK{k}"] = (
                    float(jy_per_k(spec.rest_freq_ghz, beam)),
                    f"[Jy/beam per K] {spec.label}",
                )
                cards[f"BMAJ{k}"] = (float(b.fwhm_deg), f"[deg] beam of {spec.label} before smoothing")
        return cards

    def _write(
        self, cube: CubeSpec, geometry, settings, acc, plans, result: Cube, destriper_cards, config_sha: str
    ) -> Path:
        """The FITS file of one cube."""
        grid = settings.grid
        first = cube.lines[0]
        info = MapInfo(
            object_name=self.map_name,
            band=int(plans[0].uses[0].band) if len(cube.lines) == 1 else -1,
            channel=-1,
            feeds=sorted({f for _o, f, _s in acc.used}),
            obsids=sorted({o for o, _f, _s in acc.used}),
            mjd_min=acc.mjd_range[0],
            mjd_max=acc.mjd_range[1],
            freq_hz=first.rest_freq_ghz * 1e9,
            bandwidth_hz=first.rest_freq_ghz * 1e9 * grid.step_kms / SPEED_OF_LIGHT_KMS,
            n_segment=len(acc.used),
            n_sample=int(acc.n_samples),
            calibration={
                "MODE": self.calibration,
                "SOURCE": self.calib_source,
                "MEDFACT": float(np.median([u.factor for p in plans for u in p.uses])),
            },
        )
        spectral = SpectralAxis(
            self.spectral_axis, grid.center_kms, grid.step_kms, grid.n_v, first.rest_freq_ghz * 1e9
        )
        info.cards = result.cards
        used = set(acc.used)
        info.segments = segment_records(
            [p for p in plans if (p.obsid, p.feed, p.scan) in used],
            lambda p: sorted({u.band for u in p.uses}),
        )
        params = dict(self.parameters)
        params.update(cube=cube.label)
        return write_cube_fits(
            cube.output_path,
            geometry,
            spectral,
            hit=acc.hit,
            line=result.line,
            rms=result.rms,
            hits=acc.hits,
            continuum=result.continuum,
            info=info,
            params=params,
            config_sha=config_sha,
            line_cards={**line_cards(cube.lines, settings, acc), **destriper_cards},
            hit_percentile=float(self.hit_percentile),
            min_hits=int(self.min_hits),
            resolved_config={
                "class": self.module_path,
                "params": params,
                "config_sha256": config_sha,
                "obsids": info.obsids,
                "lines": {s.label: s.rest_freq_ghz for s in cube.lines},
            },
        )


__all__ = ["CreateLineMap", "CubeSpec", "identify_line"]
