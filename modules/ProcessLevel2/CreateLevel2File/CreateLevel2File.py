"""CreateLevel2File: start the level-2 file from level-1 metadata and pointing
(docs/level2.md#createlevel2file)."""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Mapping
from typing import Annotated, Any

import numpy as np

from modules.pipeline_control import provenance
from modules.pipeline_control.parameters import Range
from modules.pipeline_control.Pipeline import BaseCOMAPModule, RetryH5PY
from utils import level1_layout as L1
from utils import level2 as l2layout
from utils.constants import GROUND_FEED, OVRO_HEIGHT_M, OVRO_LAT_DEG, OVRO_LON_DEG
from utils.coordinates import azel_to_icrs
from utils.errors import BadCOMAPFile
from utils.layout import DatasetPath
from utils.paths import unwritable_reason
from utils.source_mask import DEFAULT_MASK_RADIUS_ARCMIN, SourceMask

OPTIONAL = "optional"

DEFAULT_LEVEL1_DATASETS: list[list[Any]] = [
    [str(L1.MJD), 1.0],
    [str(L1.BANDS), 1.0],
    [str(L1.FREQUENCY), 1.0],
    [str(L1.FEATURES), 1.0],
    [str(L1.HK_VANE_ANGLE), 0.01],
    [str(L1.HK_VANE_TSHROUD), 0.01],
    [L1.HK_VANE.child("Tvane"), 0.01],
    [L1.HK_VANE.child("Tambient"), 0.01],
    [L1.HK_VANE.child("utc"), 1.0],
    [L1.HK_FRAME.child("features"), 1.0],
    [L1.HK_FRAME.child("utc"), 1.0],
    [L1.HK_WEATHER.child("airTemperature"), 0.01, OPTIONAL],
    [L1.HK_WEATHER.child("dewPointTemp"), 0.01, OPTIONAL],
    [L1.HK_WEATHER.child("pressure"), 0.01, OPTIONAL],
    [L1.HK_WEATHER.child("windSpeed"), 0.01, OPTIONAL],
    [L1.HK_WEATHER.child("windDirection"), 0.01, OPTIONAL],
    [L1.HK_WEATHER.child("utc"), 1.0, OPTIONAL],
    [str(L1.HK_TRACKER_STATUS), 1.0, OPTIONAL],
    [L1.HK_TRACKER.child("utc"), 1.0, OPTIONAL],
]

# Units of the scaled copies (docs/formats/level1.md#hk).
_UNITS = {
    "angle": "deg",
    "Tshroud": "degC",
    "Tvane": "degC",
    "Tambient": "degC",
    "utc": "MJD (hk clock)",
    "airTemperature": "degC",
    "dewPointTemp": "degC",
    "pressure": "hPa",
    "windSpeed": "m/s",
    "windDirection": "deg",
    "MJD": "MJD (UTC)",
    "frequency": "GHz",
}


_RADEC_SAMPLES_PER_CALL = 1_000_000
"""Feed samples converted to ICRS per call in CreateLevel2File (about 120 MB of temporaries)."""


class CreateLevel2File(BaseCOMAPModule):
    """Create the level-2 file: metadata, hk copies, per-feed pointing and recomputed RA/Dec, and the
    sample flags with bit 8 (pointing not finite) and bit 16 (bright source, docs/level2.md#source-mask).

    Parameters
    ----------
    output_dir : str
        Root directory of level-2 files.
    save_dir_structure : str
        Sub-path template with ``{date:<strftime>}``, ``{source}``, ``{source_group}``, ``{obsid}``.
    level1_datasets : list
        ``[path, scale]`` or ``[path, scale, "optional"]`` entries copied from level 1; a scale
        other than 1 stores ``raw.astype(float64) * scale``.
    level1_attributes : list of str
        Level-1 groups whose attributes are copied.
    compute_radec : bool
        Recompute per-sample ICRS RA/Dec from az/el (``utils.coordinates.azel_to_icrs``).
    mask_calibrator : bool
        Flag (bit 16) the samples within ``source_mask_radius_arcmin`` of the observed source when
        it is a calibrator (TauA, CasA, CygA, Jupiter at its ephemeris position).
    source_catalogue : str or None
        CSV or TOML catalogue of bright sources (name, frame, lon, lat, radius_arcmin) whose
        discs are flagged (bit 16) in every observation.
    bright_mask_map : str or None
        Bright-source map in K (FITS CAR image, or HEALPix with ``healpy``); samples where it is
        ≥ ``bright_cut_k`` are flagged (bit 16).
    bright_cut_k : float
        Cut of ``bright_mask_map``, K.
    source_mask_radius_arcmin : float
        Radius of the calibrator disc and of catalogue entries without their own radius, arcmin
        (default 2.5 beam FWHM at 30 GHz).
    overwrite : bool
        Redo even if the file is complete.
    plot : bool
        Accepted for uniformity with the other level-2 modules; this module draws no plots.
    plot_dir : str
        Accepted for uniformity with the other level-2 modules; no file is written there.
    """

    reads = (
        L1.COMAP_ATTRIBUTES,
        L1.FEEDS,
        L1.MJD,
        L1.BANDS,
        L1.FREQUENCY,
        L1.FEATURES,
        L1.PIXEL_POINTING,
        L1.HK_VANE,
        L1.HK_FRAME,
        L1.HK_WEATHER,
        L1.HK_TRACKER,
    )
    writes = (
        l2layout.FEEDS,
        l2layout.LEVEL1_FEED_INDEX,
        l2layout.SAMPLE_FLAGS,
        l2layout.PIXEL_POINTING,
        l2layout.MJD,
        l2layout.BANDS,
        l2layout.FREQUENCY,
        l2layout.FEATURES,
    )
    _COPIED = (l2layout.MJD, l2layout.BANDS, l2layout.FREQUENCY, l2layout.FEATURES)

    def __init__(
        self,
        output_dir: str = "level2",
        save_dir_structure: str = l2layout.DEFAULT_SAVE_DIR_STRUCTURE,
        level1_datasets: list | None = None,
        level1_attributes: list | None = None,
        compute_radec: bool = True,
        mask_calibrator: bool = True,
        source_catalogue: str | None = None,
        bright_mask_map: str | None = None,
        bright_cut_k: Annotated[float, Range(gt=0)] = 0.07,
        source_mask_radius_arcmin: Annotated[float, Range(gt=0)] = DEFAULT_MASK_RADIUS_ARCMIN,
        overwrite: bool = False,
        plot: bool = False,
        plot_dir: str = "outputs/CreateLevel2File",
    ) -> None:
        self.output_dir = output_dir
        self.save_dir_structure = save_dir_structure
        self.level1_datasets = DEFAULT_LEVEL1_DATASETS if level1_datasets is None else level1_datasets
        self.level1_attributes = ["comap"] if level1_attributes is None else level1_attributes
        self.compute_radec = compute_radec
        self.mask_calibrator = mask_calibrator
        self.source_catalogue = source_catalogue
        self.bright_mask_map = bright_mask_map
        self.bright_cut_k = bright_cut_k
        self.source_mask_radius_arcmin = source_mask_radius_arcmin
        self._source_mask_cache: dict[str, SourceMask] = {}
        self.overwrite = overwrite
        self.plot = plot
        self.plot_dir = plot_dir

    @classmethod
    def entry_paths(cls, entry: DatasetPath, params: Mapping[str, Any]) -> tuple[str, ...]:
        """The spectrometer axes are written only when ``level1_datasets`` copies them."""
        if entry in cls._COPIED:
            copied = (
                DEFAULT_LEVEL1_DATASETS if params["level1_datasets"] is None else params["level1_datasets"]
            )
            return (str(entry),) if any(e[0] == entry for e in copied if len(e) == 2) else ()
        return super().entry_paths(entry, params)

    @classmethod
    def parameter_rules(cls, params: Mapping[str, Any]) -> list[str]:
        problems = []
        reason = unwritable_reason(str(params["output_dir"]), directory=True)
        if reason:  # docs/configuration.md#validation: an unwritable output is a config error
            problems.append(f"output_dir: cannot write level-2 files there: {reason}")
        msg = l2layout.validate_save_dir(str(params["save_dir_structure"]))
        if msg:
            problems.append(f"save_dir_structure: {msg}")
        for i, entry in enumerate(params["level1_datasets"] or []):
            ok = (
                isinstance(entry, list | tuple)
                and len(entry) in (2, 3)
                and isinstance(entry[0], str)
                and isinstance(entry[1], int | float)
                and not isinstance(entry[1], bool)
                and (len(entry) == 2 or entry[2] == OPTIONAL)
            )
            if not ok:
                problems.append(
                    f"level1_datasets[{i}] must be [path, scale] or [path, scale, 'optional'], got {entry!r}"
                )
        try:
            SourceMask.for_observation(
                None,
                catalogue=params["source_catalogue"],
                bright_map=params["bright_mask_map"],
                radius_arcmin=float(params["source_mask_radius_arcmin"]),
            )
        except ValueError as exc:
            problems.append(str(exc))
        return problems

    def source_mask(self, source: str | None) -> SourceMask:
        """The bright-source mask of an observation of ``source`` (docs/level2.md#source-mask); the
        catalogue and map are read once per worker and cached on the instance."""
        cache = getattr(self, "_source_mask_cache", None)
        if cache is None:
            cache = self._source_mask_cache = {}
        if "" not in cache:
            try:
                cache[""] = SourceMask.for_observation(
                    None,
                    catalogue=self.source_catalogue,
                    bright_map=self.bright_mask_map,
                    bright_cut_k=self.bright_cut_k,
                    radius_arcmin=self.source_mask_radius_arcmin,
                )
            except ValueError as exc:
                raise BadCOMAPFile(str(exc)) from None
        shared = cache[""]
        calibrator = SourceMask.for_observation(source, mask_calibrator=self.mask_calibrator).calibrator
        return SourceMask(
            calibrator=calibrator,
            sources=shared.sources,
            bright_map=shared.bright_map,
            bright_cut_k=shared.bright_cut_k,
            radius_arcmin=shared.radius_arcmin,
        )

    def level2_path_for(self, file_info: Any) -> str:
        """The final (published) level-2 path of ``file_info`` (public; Level2Pipeline calls it)."""
        if not getattr(file_info, "level1_path", None):
            raise BadCOMAPFile("observation has no level1_path", obsid=getattr(file_info, "obsid", None))
        return str(
            l2layout.level2_path(
                self.output_dir,
                self.save_dir_structure,
                level1_path=file_info.level1_path,
                utc_start=file_info.utc_start or "",
                source=file_info.source or "Unknown",
                source_group=file_info.source_group,
                obsid=int(file_info.obsid),
            )
        )

    # ------------------------------------------------------------------------------------------
    def run(self, file_info: Any) -> None:
        ctx = self.observation_context(file_info)
        l1 = ctx.l1
        feeds_l1 = np.asarray(l1.feeds(), dtype=int)
        positions = [i for i, f in enumerate(feeds_l1) if f != GROUND_FEED]
        sci_feeds = feeds_l1[positions]
        n_tod = l1.n_tod
        path = file_info.level2_path
        stat = os.stat(l1.path)
        with RetryH5PY(path, "a") as l2:
            root = l2.attrs
            root["obsid"] = int(ctx.obsid)
            root["level2_format_version"] = l2layout.FORMAT_VERSION
            root["comap_reduce_version"] = provenance.code_version()
            if "created_utc" not in root:
                root["created_utc"] = provenance.utc_now_iso()
            root["updated_utc"] = provenance.utc_now_iso()
            root["level1_path"] = os.path.abspath(l1.path)
            root["level1_size_bytes"] = int(stat.st_size)
            root["level1_mtime_utc"] = _dt.datetime.fromtimestamp(stat.st_mtime, _dt.UTC).strftime(
                "%Y-%m-%dT%H:%M:%SZ"
            )
            root["hk_time_offset_s"] = float(ctx.hk_time_offset_s)

            for group in self.level1_attributes:
                if group not in l1.file:
                    raise BadCOMAPFile(f"missing group /{group} in the level-1 file")
                dst = l2.require_group(group)
                for key, value in l1.file[group].attrs.items():
                    dst.attrs[key] = value

            spec = l2.require_group(l2layout.SPECTROMETER)
            self._replace(spec, "feeds", sci_feeds.astype(np.int32))
            self._replace(spec, "level1_feed_index", np.asarray(positions, dtype=np.int32))

            for entry in self.level1_datasets:
                src, scale = entry[0], float(entry[1])
                optional = len(entry) > 2 and entry[2] == OPTIONAL
                if not l1.has_dataset(src):
                    if optional:
                        continue
                    raise BadCOMAPFile(f"missing dataset {src}")
                raw = l1.file[src][...]
                data = raw.astype(np.float64) * scale if scale != 1.0 else raw
                grp = l2.require_group(os.path.dirname(src))
                ds = self._replace(grp, os.path.basename(src), data)
                unit = _UNITS.get(os.path.basename(src))
                if unit and (scale != 1.0 or l2layout.SPECTROMETER.covers(src)):
                    ds.attrs["unit"] = unit
                if scale != 1.0:
                    ds.attrs["scale_applied"] = scale
                self.mark_complete(ds)

            pp = l2.require_group(l2layout.PIXEL_POINTING)
            for name in ("pixel_ra", "pixel_dec"):  # recomputed below; never left stale
                if name in pp:
                    provenance.mark_incomplete(pp[name])
            chunks = (1, int(min(n_tod, 65536))) if n_tod > 0 else None
            az_ds = self._create(pp, "pixel_az", (len(positions), n_tod), np.float64, chunks)
            el_ds = self._create(pp, "pixel_el", (len(positions), n_tod), np.float64, chunks)
            ra_ds = self._create(pp, "pixel_ra", (len(positions), n_tod), np.float64, chunks)
            dec_ds = self._create(pp, "pixel_dec", (len(positions), n_tod), np.float64, chunks)
            flags = self._create(
                l2.require_group(l2layout.LEVEL2_GROUP),
                "sample_flags",
                (len(positions), n_tod),
                np.uint8,
                chunks,
            )
            mjd = l1.mjd()
            mask = self.source_mask(getattr(file_info, "source", None))
            n_bright = 0
            azel = [l1.pointing(pos, slice(None)) for pos in positions]
            radec: dict[int, tuple[np.ndarray, np.ndarray]] = {}
            # feeds in groups of about _RADEC_SAMPLES_PER_CALL samples: the astrometry of each time
            # block is computed once per group, not once per feed (docs/mapmaking.md#coordinates),
            # and the temporaries stay bounded
            per_call = max(1, _RADEC_SAMPLES_PER_CALL // max(n_tod, 1))
            for first in range(0, len(positions) if self.compute_radec else 0, per_call):
                group = range(first, min(first + per_call, len(positions)))
                ra_g, dec_g = azel_to_icrs(
                    np.asarray([azel[k][0] for k in group], dtype=np.float64),
                    np.asarray([azel[k][1] for k in group], dtype=np.float64),
                    mjd,
                )
                radec.update({k: (ra_g[j], dec_g[j]) for j, k in enumerate(group)})
            for ifeed, pos in enumerate(positions):
                az = np.asarray(azel[ifeed][0], dtype=np.float64)
                el = np.asarray(azel[ifeed][1], dtype=np.float64)
                az_ds[ifeed] = az
                el_ds[ifeed] = el
                if self.compute_radec:
                    ra, dec = radec.pop(ifeed)
                else:
                    ra = np.asarray(l1.file[L1.PIXEL_RA][pos], dtype=np.float64)
                    dec = np.asarray(l1.file[L1.PIXEL_DEC][pos], dtype=np.float64)
                ra_ds[ifeed] = ra
                dec_ds[ifeed] = dec
                bad = ~(np.isfinite(az) & np.isfinite(el) & np.isfinite(ra) & np.isfinite(dec))
                row = np.zeros(n_tod, dtype=np.uint8)
                row[bad] = l2layout.FLAG_POINTING
                if not mask.empty:
                    on_source = mask.mask(ra, dec, mjd)
                    row[on_source] |= np.uint8(l2layout.FLAG_BRIGHT_SOURCE)
                    n_bright += int(on_source.sum())
                flags[ifeed] = row
            flags.attrs["bright_source_mask"] = mask.describe()
            flags.attrs["n_bright_source_samples"] = n_bright
            if n_bright:
                self.logger.info("source mask (%s): %d samples flagged", mask.describe(), n_bright)
            for ds, frame in ((ra_ds, "icrs"), (dec_ds, "icrs")):
                ds.attrs["frame"] = frame
                ds.attrs["refraction"] = False
                ds.attrs["site"] = (
                    f"OVRO lon {OVRO_LON_DEG} deg, lat {OVRO_LAT_DEG} deg, height {OVRO_HEIGHT_M} m"
                )
                ds.attrs["computed_from"] = "pixel_az, pixel_el" if self.compute_radec else "level-1 copy"
                ds.attrs["unit"] = "deg"
            az_ds.attrs["unit"] = "deg"
            el_ds.attrs["unit"] = "deg"
            self.mark_complete(l2[l2layout.FEEDS])
            self.mark_complete(l2[l2layout.LEVEL1_FEED_INDEX])
            self.mark_complete(flags)
            for ds in (az_ds, el_ds, ra_ds):
                self.mark_complete(ds)
            self.mark_complete(pp)
            self.mark_complete(dec_ds)  # the done-check: last

    @staticmethod
    def _replace(group: Any, name: str, data: np.ndarray) -> Any:
        if name in group:
            del group[name]
        return group.create_dataset(name, data=data, track_times=False)

    @staticmethod
    def _create(group: Any, name: str, shape: tuple[int, int], dtype: Any, chunks: Any) -> Any:
        if name in group:
            del group[name]
        return group.create_dataset(name, shape=shape, dtype=dtype, chunks=chunks, track_times=False)
