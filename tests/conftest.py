"""Shared pytest fixtures.

* No network: sockets may only connect to loopback (docs/developer.md#tests). Jupiter, IERS and coordinate
  tests must pass with this guard on.
* Simulated archives (``test-tiny``, ``test-small``) are made once per session (section below).
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

# --------------------------------------------------------------------------------------------------
# The reliability campaign (docs/reliability.md): every test under tests/reliability/ carries the
# ``reliability`` marker, so ``pytest -m reliability`` runs it alone. (The hook lives here, not in a
# conftest of that folder, because a second ``conftest`` module would shadow this one for the test
# files that import helpers from it.)
# --------------------------------------------------------------------------------------------------
_RELIABILITY_DIR = Path(__file__).resolve().parent / "reliability"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _RELIABILITY_DIR in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.reliability)


# --------------------------------------------------------------------------------------------------
# No network except loopback
# --------------------------------------------------------------------------------------------------
_LOOPBACK_HOSTS = {"127.0.0.1", "::1", "localhost", "0.0.0.0"}
_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex
_real_getaddrinfo = socket.getaddrinfo


def _check_address(address) -> None:
    if isinstance(address, tuple) and address:
        host = str(address[0])
        if host not in _LOOPBACK_HOSTS and not host.startswith("127."):
            raise OSError(f"network access to {host} is disabled in tests")


def _guarded_connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _check_address(address)
    return _real_connect(self, address)


def _guarded_connect_ex(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _check_address(address)
    return _real_connect_ex(self, address)


def _guarded_getaddrinfo(host, *args, **kwargs):
    if host is not None and str(host) not in _LOOPBACK_HOSTS and not str(host).startswith("127."):
        raise socket.gaierror(f"name resolution of {host} is disabled in tests")
    return _real_getaddrinfo(host, *args, **kwargs)


@pytest.fixture(autouse=True, scope="session")
def _no_network():
    """Disable non-loopback network access for the whole session."""
    socket.socket.connect = _guarded_connect
    socket.socket.connect_ex = _guarded_connect_ex
    socket.getaddrinfo = _guarded_getaddrinfo
    try:
        yield
    finally:
        socket.socket.connect = _real_connect
        socket.socket.connect_ex = _real_connect_ex
        socket.getaddrinfo = _real_getaddrinfo


# --------------------------------------------------------------------------------------------------
# Simulated archives (made once per session)
# --------------------------------------------------------------------------------------------------


class SimulatedArchive:
    """A simulated archive built once per session.

    Attributes
    ----------
    root : pathlib.Path
        Archive root (``<root>/<YYYY-MM>/comap-*.hd5`` and ``<root>/obs_index.csv``).
    paths : list of pathlib.Path
        Level-1 files in obsid order.
    by_source : dict
        Source name (``/comap.source``) → path of the first file with that source, e.g.
        ``by_source["TauA"]``, ``by_source["GField30"]``, ``by_source["SkyDip"]``.
    preset : str
        Preset name.
    """

    def __init__(self, preset: str, root, paths) -> None:
        import h5py

        self.preset = preset
        self.root = root
        self.paths = list(paths)
        self.by_source: dict = {}
        for p in self.paths:
            with h5py.File(p, "r") as f:
                self.by_source.setdefault(str(f["comap"].attrs["source"]), p)

    def __getitem__(self, key):
        """``archive["TauA"]`` etc. (source name), or ``archive["root"]`` / ``archive["paths"]``."""
        if key in ("root", "paths"):
            return getattr(self, key)
        return self.by_source[key]

    def __repr__(self) -> str:
        return f"SimulatedArchive({self.preset!r}, {self.root}, {len(self.paths)} files)"


def _build_archive(tmp_path_factory, preset: str) -> SimulatedArchive:
    from utils.simulator import make_archive

    root = tmp_path_factory.mktemp(preset)
    return SimulatedArchive(preset, root, make_archive(preset, root, seed=1))


@pytest.fixture(scope="session")
def tiny_archive(tmp_path_factory) -> SimulatedArchive:
    """The ``test-tiny`` preset (one GField30 CES file; feeds 1, 2, 20; 16 channels), seed 1.

    Treat the files as read-only: copy a file before mutating it.
    """
    return _build_archive(tmp_path_factory, "test-tiny")


@pytest.fixture(scope="session")
def small_archive(tmp_path_factory) -> SimulatedArchive:
    """The ``test-small`` preset (TauA Lissajous, sky dip, GField30 CES; feeds 1, 2, 3, 20;
    32 channels), seed 1. ``small_archive["TauA"]``, ``["SkyDip"]`` and ``["GField30"]`` give the paths.

    Treat the files as read-only: copy a file before mutating it.
    """
    return _build_archive(tmp_path_factory, "test-small")


def small_line_raster():
    """A 120 s raster of 13 rows 1′ apart over ±0.1° at 0.1°/s: the compact RRL raster the cube tests
    observe their HII region with (enough samples per 1′ pixel for the line's noise)."""
    from utils.simulator import ScanSpec

    return ScanSpec(
        kind="raster", duration_s=120.0, n_rows=13, step_arcmin=1.0, half_width_deg=0.1, speed_deg_s=0.1
    )


@pytest.fixture(scope="session")
def truth_field(tmp_path_factory):
    """A field with five crossing CES observations and a Tau A observation, reduced by the shipped
    level-2 chain and the demo's CalibrationModel (tests/truth_field.py); ``truth_field.make_maps``
    runs CreateMap jobs at default settings. About a minute of CPU."""
    from truth_field import TruthField

    return TruthField(tmp_path_factory.mktemp("truth-field"))


@pytest.fixture(scope="session")
def faint_truth_field(tmp_path_factory):
    """The ``truth_field`` observations with the field's sky times ``FAINT_SKY_SCALE`` (the Tau A
    calibrator unchanged): a noise-dominated field, on which χ²/N tests the map's noise model rather
    than the signal's systematics (tests/truth_field.py)."""
    from truth_field import FAINT_SKY_SCALE, TruthField

    return TruthField(tmp_path_factory.mktemp("faint-truth-field"), sky_scale=FAINT_SKY_SCALE)


# --------------------------------------------------------------------------------------------------
# Running the pipeline in a scratch directory
# --------------------------------------------------------------------------------------------------

REPO_ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]

MAP_HDUS = ("DESTRIPED", "NAIVE", "HITS", "RMS", "MASK", "RMS_WHITE", "OBSLIST", "SEGNOISE")
"""The HDUs of a CreateMap FITS file, in order (docs/mapmaking.md#name-and-hdus)."""

DEFAULT_LEVEL2_MODULES = [
    "modules.ProcessLevel2.CheckLevel1FileExists.CheckLevel1FileExists.CheckLevel1FileExists()",
    "modules.ProcessLevel2.CreateLevel2File.CreateLevel2File.CreateLevel2File(output_dir='level2')",
]

# The level-2 modules up to NoiseStatsLevel2 (two binned channels), as call strings for l2.toml.
LEVEL2_THROUGH_NOISE_STATS = [
    "modules.ProcessLevel2.CheckLevel1FileExists.CheckLevel1FileExists.CheckLevel1FileExists()",
    "modules.ProcessLevel2.CreateLevel2File.CreateLevel2File.CreateLevel2File(output_dir='level2')",
    "modules.ProcessLevel2.SystemTemperature.SystemTemperature.SystemTemperature()",
    "modules.ProcessLevel2.FindScans.FindScans.FindScans()",
    "modules.ProcessLevel2.NoiseStatsLevel1.NoiseStatsLevel1.NoiseStatsLevel1()",
    "modules.ProcessLevel2.AtmosphereInObservation.AtmosphereInObservation.AtmosphereInObservation()",
    "modules.ProcessLevel2.GainFilterAndBin.GainFilterAndBin.GainFilterAndBin(n_freq_bin=2)",
    "modules.ProcessLevel2.PostBinCleaning.PostBinCleaning.PostBinCleaning()",
    "modules.ProcessLevel2.NoiseStatsLevel2.NoiseStatsLevel2.NoiseStatsLevel2()",
]


class PipelineWorkspace:
    """A scratch directory with a level-1 tree, a database and configs, run through ``run.py``.

    Attributes
    ----------
    root : Path
        Working directory of every run (configs use paths relative to it).
    level1 : Path
        Level-1 tree (copies of the archive files given).
    db_path : Path
        SQLite database of the workspace.
    """

    def __init__(self, root, files, *, copy: bool = True) -> None:
        import shutil
        from pathlib import Path

        self.root = Path(root)
        self.level1 = self.root / "level1"
        self.level1.mkdir(parents=True, exist_ok=True)
        for f in files:
            dst = self.level1 / Path(f).name
            if copy:
                shutil.copyfile(f, dst)
            else:
                dst.symlink_to(f)
        self.db_path = self.root / "db.sqlite"
        self.extra_path: list[str] = []

    def write_configs(
        self,
        level2_modules=None,
        *,
        nprocess: int = 1,
        module_paths=(),
        extra_stages=(),
        level2_master: str = "",
        stage_kwargs: str = "",
    ) -> None:
        """Write ``main.toml`` (DataAssess + Level2Pipeline) and ``l2.toml``."""
        mods = DEFAULT_LEVEL2_MODULES if level2_modules is None else level2_modules
        mp = ", ".join(repr(p) for p in module_paths)
        stages = [
            "modules.DataAcquisition.DataAssess.DataAssess.DataAssess(level1_data_paths=['level1'], "
            "level2_data_paths=['level2'])",
            f"modules.ProcessLevel2.ProcessLevel2.Level2Pipeline(config_file='l2.toml'{stage_kwargs})",
            *extra_stages,
        ]
        (self.root / "main.toml").write_text(
            "[Master]\n"
            f"sql_database = 'db.sqlite'\nmodule_paths = [{mp}]\n"
            "pipeline = [\n" + "".join(f"  {s!r},\n" for s in stages) + "]\n"
        )
        (self.root / "l2.toml").write_text(
            f"[Master]\nsql_database = 'db.sqlite'\nnprocess = {nprocess}\n{level2_master}\n"
            "pipeline = [\n" + "".join(f"  {m!r},\n" for m in mods) + "]\n"
        )

    def env(self) -> dict:
        import os

        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *self.extra_path])
        env.pop("COLUMNS", None)
        return env

    def run(self, *args: str, timeout: float = 600, config: str = "main.toml"):
        """Run ``python run.py <config> *args`` in the workspace; return the CompletedProcess."""
        import subprocess
        import sys

        return subprocess.run(
            [sys.executable, str(REPO_ROOT / "run.py"), config, *args],
            cwd=self.root,
            capture_output=True,
            text=True,
            env=self.env(),
            timeout=timeout,
        )

    def popen(self, *args: str, config: str = "main.toml"):
        import subprocess
        import sys

        with open(self.root / "popen.out", "w") as out, open(self.root / "popen.err", "w") as err:
            return subprocess.Popen(
                [sys.executable, str(REPO_ROOT / "run.py"), config, *args],
                cwd=self.root,
                stdout=out,
                stderr=err,
                env=self.env(),
                start_new_session=True,
            )

    def level2_files(self) -> list:
        return sorted((self.root / "level2").rglob("Level2_*.hd5")) if (self.root / "level2").exists() else []

    def staging_files(self) -> list:
        if not (self.root / "level2").exists():
            return []
        return sorted(p for p in (self.root / "level2").rglob(".Level2_*") if p.is_file())

    def db(self):
        """The facade connected (read-write) to the workspace database; disconnect when done."""
        from modules.SQLModule.SQLModule import db

        db.connect(str(self.db_path), create=False)
        return db


@pytest.fixture()
def workspace_factory(tmp_path):
    """``make(files, copy=True) -> PipelineWorkspace`` in a fresh directory under ``tmp_path``."""
    counter = {"n": 0}
    made = []

    def make(files, *, copy: bool = True) -> PipelineWorkspace:
        counter["n"] += 1
        ws = PipelineWorkspace(tmp_path / f"ws{counter['n']}", files, copy=copy)
        made.append(ws)
        return ws

    yield make
    from modules.SQLModule.SQLModule import db

    db.disconnect()


# --------------------------------------------------------------------------------------------------
# Reducing one observation in process (stage tests)
# --------------------------------------------------------------------------------------------------


def default_level2_modules(**overrides):
    """Instances of the default level-2 list up to GainFilterAndBin; ``overrides`` maps a class
    name to keyword arguments (or to None to leave that module out)."""
    from modules.ProcessLevel2.AtmosphereInObservation.AtmosphereInObservation import AtmosphereInObservation
    from modules.ProcessLevel2.CheckLevel1FileExists.CheckLevel1FileExists import CheckLevel1FileExists
    from modules.ProcessLevel2.CreateLevel2File.CreateLevel2File import CreateLevel2File
    from modules.ProcessLevel2.FindScans.FindScans import FindScans
    from modules.ProcessLevel2.GainFilterAndBin.GainFilterAndBin import GainFilterAndBin
    from modules.ProcessLevel2.NoiseStatsLevel1.NoiseStatsLevel1 import NoiseStatsLevel1
    from modules.ProcessLevel2.SystemTemperature.SystemTemperature import SystemTemperature

    classes = [
        CheckLevel1FileExists,
        CreateLevel2File,
        SystemTemperature,
        FindScans,
        NoiseStatsLevel1,
        AtmosphereInObservation,
        GainFilterAndBin,
    ]
    out = []
    for cls in classes:
        if cls.__name__ in overrides and overrides[cls.__name__] is None:
            continue
        out.append(cls(**overrides.get(cls.__name__, {})))
    return out


def reduce_in_process(level1_path, out_dir, modules, *, source_group=None):
    """Run ``modules`` on one level-1 file exactly as a Level2Pipeline worker does, without a
    database. Returns (level2_path, context, deferred DB ops)."""
    from modules.ProcessLevel2.observation import reduce_in_process as reduce

    return reduce(level1_path, out_dir, modules, source_group=source_group)


# --------------------------------------------------------------------------------------------------
# Database back-ends: SQLite files and a PostgreSQL server started once per session
# (docs/developer.md#postgresql-in-the-tests)
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def pg_server():
    """The session's PostgreSQL server (tests/pg_server.py); skips, or fails under
    ``COMAP_REQUIRE=postgres``, when the binaries or psycopg are missing."""
    from components import missing
    from pg_server import PostgresServer, ServerUnavailable

    try:
        server = PostgresServer()
    except ServerUnavailable as exc:
        missing("postgres", str(exc))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_url(pg_server):
    """SQLAlchemy URL of a fresh, empty PostgreSQL database (dropped after the test)."""
    url = pg_server.new_database()
    yield url
    pg_server.drop_database(url)


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path):
    """A fresh, empty database on each back-end: a SQLite path, or a PostgreSQL URL."""
    if request.param == "sqlite":
        return str(tmp_path / "db" / "test.db")
    return request.getfixturevalue("pg_url")


def write_demo_like_configs(root: Path, remote: Path, *, main_master: str = "", sub_master: str = "") -> None:
    """The demo's ``main_run.toml`` with its paths in ``root``: acquisition from ``remote``, the
    shipped level-2 chain, one map (GField30, band 1, channel 0) and the demo's stacked RRL cube.

    ``main_master`` and ``sub_master`` are extra ``[Master]`` lines (e.g. a ``log_file`` or
    ``nprocess``) of ``main.toml`` and of the three sub-configs.
    """
    import tomllib

    r = f"{remote}/"
    stages = [
        "modules.DataAcquisition.DataCheckRemote.DataCheckRemote.DataCheckRemote("
        f"remote={r!r}, local_dir='level1', remote_index='obs_index.csv')",
        "modules.DataAcquisition.DataAcquisition.DataAcquisition.DataAcquisition("
        f"remote={r!r}, local_dir='level1', remote_index='obs_index.csv')",
        "modules.DataAcquisition.DataAssess.DataAssess.DataAssess(level1_data_paths=['level1'], "
        "level2_data_paths=['level2'])",
        "modules.ProcessLevel2.ProcessLevel2.Level2Pipeline(config_file='l2.toml')",
        "modules.ProcessLevel2.CalibrationModel.CalibrationModel.CalibrationModel(source='TauA', "
        "model_type='mean', min_observations=1, output_path='calibration/calibration_model.json')",
        "modules.MapMaking.MapMaking.MapMaking(config_file='maps.toml')",
        "modules.MapMaking.MapMaking.LineMapMaking(config_file='cubes.toml')",
    ]
    main = f"[Master]\nsql_database = 'db.sqlite'\n{main_master}pipeline = [\n"
    (root / "main.toml").write_text(main + "".join(f"  {s!r},\n" for s in stages) + "]\n")
    with open(REPO_ROOT / "parameter_files" / "level2_processing.toml", "rb") as f:
        modules = [m.replace("demo/level2", "level2") for m in tomllib.load(f)["Master"]["pipeline"]]
    db = f"[Master]\nsql_database = 'db.sqlite'\n{sub_master}"
    (root / "l2.toml").write_text(f"{db}pipeline = [\n" + "".join(f"  {m!r},\n" for m in modules) + "]\n")
    (root / "maps.toml").write_text(
        f'{db}pipeline = [\n  "modules.MapMaking.MapMakingModules.CreateMap.CreateMap('
        "map_name='GField30', source='GField30', band=1, channel=0)\",\n]\n"
        "[modules.MapMaking.MapMakingModules.CreateMap.CreateMap]\noutput_dir = 'maps'\n"
    )
    (root / "cubes.toml").write_text(
        f'{db}pipeline = [\n  "modules.MapMaking.MapMakingModules.CreateLineMap.CreateLineMap('
        "map_name='GField30', source='GField30', lines=['H58a', 'H59a', 'H60a', 'H61a', 'H62a'])\",\n]\n"
        "[modules.MapMaking.MapMakingModules.CreateLineMap.CreateLineMap]\noutput_dir = 'cubes'\n"
    )
