"""A simulated field reduced by the default pipeline, for the truth tests of
docs/mapmaking.md#end-to-end-map-validation.

:func:`truth_field_archive` describes the observations; :class:`TruthField` simulates them, runs the
shipped level-2 chain (parameter_files/level2_processing.toml, only the output directory changed),
CalibrationModel as the demo runs it (parameter_files/main_run.toml) and CreateMap with its default
settings (calibration='model' included), and gives the FITS paths.

Observations (16 channels, feeds 1–3 and the ground feed, two 60 s CES segments each). A CES at
a given hour angle covers the same strip of sky on every date, so the field is observed rising
(HA −2.5 h) and setting (HA +2.5 h) on each of three dates, two nights and a day between them: the
day/night and first/second-half halves then cover the same pixels, and rising and setting strips
cross at the field centre.

=======  ==========  =====  ==============================================================
obsid    date        HA h   what
=======  ==========  =====  ==============================================================
93001    2026-03-01  −1.0   Tau A Lissajous, 150 s (the calibration model's only input)
93002    2026-08-01  −2.5   GField30 CES, rising (night, 20:30 local)
93003    2026-08-01  +2.5   GField30 CES, setting (night)
93004    2026-12-20  −2.5   GField30 CES, rising (day)
93005    2026-12-20  +2.5   GField30 CES, setting (day)
93006    2027-08-01  −2.5   GField30 CES, rising (night)
93007    2027-08-01  +2.5   GField30 CES, setting (night)
=======  ==========  =====  ==============================================================

A Lissajous of the field (tried) is left out: the default level-2 chain removes the field's
large-scale structure from it (χ²/N ≈ 30 against the truth), a transfer-function matter beyond
these tests.

The field is the Galactic GField30 sky (ridge and three compact HII regions) plus the added
components of :func:`utils.simulator.variety.field_components` (a point source, an AME-like
Gaussian, a free-free Gaussian and a synchrotron gradient).
"""

from __future__ import annotations

import time
import tomllib
from pathlib import Path

from conftest import REPO_ROOT, PipelineWorkspace

from utils.simulator import make_archive
from utils.simulator.spec import ArchiveSpec, ScanSpec
from utils.simulator.variety import calibrator_observation, field_observation, scaled_sky

N_CHANNELS = 16
FEEDS = (1, 2, 3)
CREATE_MAP = "modules.MapMaking.MapMakingModules.CreateMap.CreateMap"
FIELD_OBSIDS = (93002, 93003, 93004, 93005, 93006, 93007)
CALIBRATOR_OBSID = 93001
MAP_BAND, MAP_CHANNEL = 1, 0
FAINT_SKY_SCALE = 0.03
"""Sky scale of the noise-dominated copy of the field: its brightest HII region peaks at ~0.1 K and
the ridge at ~15 mK against ~3–10 mK of noise per 1′ pixel, so signal systematics of a few per cent
(filter transfer, pixelisation) stay well below the noise while the field keeps its shape."""


def truth_field_archive(sky_scale: float = 1.0) -> ArchiveSpec:
    """The observations of the module docstring's table, in time order of their obsids; the field's
    sky multiplied by ``sky_scale`` (the calibrator's is not)."""

    def field(obsid: int, date: str, ha: float):
        spec = field_observation(obsid, ha, n_channels=N_CHANNELS, feeds=FEEDS).replace(date=date)
        return spec if sky_scale == 1.0 else scaled_sky(spec, sky_scale)

    # the demo's Tau A scan (presets 'demo'): a 150 s Lissajous of ±0.5 deg
    taua = calibrator_observation(
        "lissajous", obsid=CALIBRATOR_OBSID, hour_angle_h=-1.0, n_channels=N_CHANNELS, feeds=FEEDS
    ).replace(scan=ScanSpec(kind="lissajous"))
    return ArchiveSpec(
        "truth-field",
        [
            taua,
            field(93002, "2026-08-01", -2.5),
            field(93003, "2026-08-01", +2.5),
            field(93004, "2026-12-20", -2.5),
            field(93005, "2026-12-20", +2.5),
            field(93006, "2027-08-01", -2.5),
            field(93007, "2027-08-01", +2.5),
        ],
    )


def shipped_level2_modules(output_dir: str = "level2") -> list[str]:
    """The level-2 pipeline of parameter_files/level2_processing.toml with its output directory
    replaced: the default chain a user runs."""
    with open(REPO_ROOT / "parameter_files" / "level2_processing.toml", "rb") as f:
        mods = tomllib.load(f)["Master"]["pipeline"]
    return [m.replace("output_dir='demo/level2'", f"output_dir={output_dir!r}") for m in mods]


def shipped_calibration_model(output_path: str = "calibration/calibration_model.json") -> str:
    """The CalibrationModel stage of parameter_files/main_run.toml (its output path replaced)."""
    with open(REPO_ROOT / "parameter_files" / "main_run.toml", "rb") as f:
        stages = tomllib.load(f)["Master"]["pipeline"]
    (stage,) = [s for s in stages if ".CalibrationModel(" in s]
    return stage.replace(
        "output_path='demo/calibration/calibration_model.json'", f"output_path={output_path!r}"
    )


class TruthField:
    """The reduced field: level-1 archive, workspace after level 2 and the calibration model, and
    :meth:`make_maps` for CreateMap jobs at default settings.

    Attributes
    ----------
    ws : PipelineWorkspace
    level1 : list of Path
        Level-1 files (obsid order).
    seconds : dict
        Wall-clock cost of each step (``simulate``, ``level2``, and one entry per map job).
    """

    def __init__(self, root: Path, sky_scale: float = 1.0) -> None:
        self.seconds: dict[str, float] = {}
        t0 = time.perf_counter()
        self.level1 = make_archive(truth_field_archive(sky_scale), root / "archive", seed=11)
        self.seconds["simulate"] = time.perf_counter() - t0
        self.ws = PipelineWorkspace(root / "ws", self.level1)
        self.ws.write_configs(
            shipped_level2_modules(), nprocess=2, extra_stages=[shipped_calibration_model()]
        )
        t0 = time.perf_counter()
        res = self.ws.run()
        self.seconds["level2"] = time.perf_counter() - t0
        if res.returncode != 0:
            raise RuntimeError(f"truth field: level 2 failed\n{res.stdout}\n{res.stderr}")

    def make_maps(self, name: str, **kwargs) -> tuple[list[Path], str]:
        """Run one CreateMap job (``map_name=name``, source GField30, band 1, channel 0, otherwise
        defaults and ``kwargs``) through MapMaking; return (FITS files written, stderr)."""
        args = ", ".join(
            [f"map_name={name!r}", "source='GField30'", f"band={MAP_BAND}", f"channel={MAP_CHANNEL}"]
            + [f"{k}={v!r}" for k, v in kwargs.items()]
            + ["output_dir='maps'"]
        )
        root = self.ws.root
        (root / f"maps_{name}.toml").write_text(
            "[Master]\nsql_database = 'db.sqlite'\nnprocess = 1\n"
            f"pipeline = [\n  {CREATE_MAP + '(' + args + ')'!r},\n]\n"
        )
        stage = f"modules.MapMaking.MapMaking.MapMaking(config_file='maps_{name}.toml')"
        (root / f"main_{name}.toml").write_text(
            f"[Master]\nsql_database = 'db.sqlite'\npipeline = [\n  {stage!r},\n]\n"
        )
        t0 = time.perf_counter()
        res = self.ws.run(config=f"main_{name}.toml")
        self.seconds[f"maps {name}"] = time.perf_counter() - t0
        files = sorted((root / "maps").glob(f"{name}_band*.fits"))
        return files, res.stdout + res.stderr

    def observation_pairs(self) -> list[tuple[Path, Path]]:
        """(level-1, level-2) paths of the field observations (for ``binned_truth``)."""
        level2 = {p.name[len("Level2_") :]: p for p in self.ws.level2_files()}
        field = [p for p in self.level1 if any(f"-{obsid:07d}-" in p.name for obsid in FIELD_OBSIDS)]
        return [(p, level2[p.name]) for p in field if p.name in level2]
