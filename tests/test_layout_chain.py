"""Declared reads and writes: the chain check at config load, undeclared user modules, user
registry entries and templated entries."""

from __future__ import annotations

import logging
import sys
import textwrap

import pytest

from modules.pipeline_control.config import ErrorCollector, load_config
from modules.ProcessLevel2.CalibratorFitting.CalibratorFitting import CalibratorFitting
from modules.ProcessLevel2.NoiseStatsLevel2.NoiseStatsLevel2 import NoiseStatsLevel2
from modules.ProcessLevel2.PostBinCleaning.PostBinCleaning import PostBinCleaning
from utils.layout import DatasetPath
from utils.level2 import BINNED_DATA, LEVEL2

P = "modules.ProcessLevel2"
CREATE = f"{P}.CreateLevel2File.CreateLevel2File.CreateLevel2File(output_dir='level2')"
VANE = f"{P}.SystemTemperature.SystemTemperature.SystemTemperature()"
SCANS = f"{P}.FindScans.FindScans.FindScans()"
NOISE1 = f"{P}.NoiseStatsLevel1.NoiseStatsLevel1.NoiseStatsLevel1()"
ATM = f"{P}.AtmosphereInObservation.AtmosphereInObservation.AtmosphereInObservation()"
GAIN = f"{P}.GainFilterAndBin.GainFilterAndBin.GainFilterAndBin()"
CLEAN = f"{P}.PostBinCleaning.PostBinCleaning.PostBinCleaning()"
NOISE2 = f"{P}.NoiseStatsLevel2.NoiseStatsLevel2.NoiseStatsLevel2()"
CALFIT = f"{P}.CalibratorFitting.CalibratorFitting.CalibratorFitting()"
FULL = [CREATE, VANE, SCANS, NOISE1, ATM, GAIN, CLEAN, NOISE2, CALFIT]

USER_PACKAGE = '''
from modules.pipeline_control.Pipeline import BaseCOMAPModule, RetryH5PY
from utils.level2 import BINNED_DATA, LEVEL2

RESULT = LEVEL2.register("mylab_chain/result", axes=("F",), dtype="float32", unit="K",
                         description="test entry")


class Writer(BaseCOMAPModule):
    reads = (BINNED_DATA,)
    writes = (RESULT,)

    def run(self, file_info):
        pass


class Reader(BaseCOMAPModule):
    reads = (RESULT,)
    writes = ()

    def run(self, file_info):
        pass


class MyNewModule(BaseCOMAPModule):
    """The seed README's template: declares nothing."""

    def __init__(self, param1=True, output_dir="marks", overwrite=False):
        self.param1 = param1
        self.output_dir = output_dir
        self.overwrite = overwrite

    def already_processed(self, file_info, overwrite=False):
        import os
        return os.path.exists(f"{self.output_dir}/{file_info.obsid}.txt") and not overwrite

    def run(self, file_info):
        import os
        os.makedirs(self.output_dir, exist_ok=True)
        with open(f"{self.output_dir}/{file_info.obsid}.txt", "w") as fh:
            fh.write("ran")
'''


@pytest.fixture()
def userpkg(tmp_path, monkeypatch):
    pkg = tmp_path / "pkgroot" / "mylab_chain"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "mods.py").write_text(textwrap.dedent(USER_PACKAGE))
    monkeypatch.syspath_prepend(str(tmp_path / "pkgroot"))
    yield pkg
    for name in [m for m in sys.modules if m.startswith("mylab_chain")]:
        del sys.modules[name]


def load(tmp_path, pipeline, module_paths=()):
    cfg = tmp_path / "l2.toml"
    cfg.write_text(
        "[Master]\n"
        f"module_paths = {list(module_paths)!r}\n"
        "pipeline = [\n" + "".join(f"  {m!r},\n" for m in pipeline) + "]\n"
    )
    errors = ErrorCollector()
    load_config(cfg, "level2", errors)
    return errors.errors


def test_default_order_passes(tmp_path):
    assert load(tmp_path, FULL) == []


@pytest.mark.parametrize(
    "order, stage, dataset",
    [
        ([CREATE, VANE, SCANS, CALFIT, NOISE1, ATM, GAIN], "CalibratorFitting", "level2/central_freqs"),
        ([CREATE, VANE, SCANS, CLEAN, NOISE1, ATM, GAIN], "PostBinCleaning", "level2/binned_filtered_data"),
        (
            [CREATE, VANE, SCANS, NOISE1, ATM, GAIN, NOISE2, CLEAN],
            "NoiseStatsLevel2",
            "level2/binned_cleaned_data",
        ),
        ([CREATE, SCANS, NOISE1, ATM, GAIN, VANE], "NoiseStatsLevel1", "level2/vane"),
    ],
)
def test_wrong_order_is_a_config_error(tmp_path, order, stage, dataset):
    errors = load(tmp_path, order)
    messages = [e.message for e in errors if stage in e.message and dataset in e.message]
    assert messages, [e.line() for e in errors]
    assert "neither the level-1 file nor an earlier module" in messages[0]


def test_configured_dataset_names_are_followed(tmp_path):
    renamed = f"{P}.PostBinCleaning.PostBinCleaning.PostBinCleaning(output_dataset='level2/other')"
    noise = f"{P}.NoiseStatsLevel2.NoiseStatsLevel2.NoiseStatsLevel2(filtered_dataset='level2/other')"
    assert load(tmp_path, [CREATE, VANE, SCANS, NOISE1, ATM, GAIN, renamed, noise]) == []
    errors = load(tmp_path, [CREATE, VANE, SCANS, NOISE1, ATM, GAIN, CLEAN, noise])
    assert any("level2/other" in e.message for e in errors)


def test_user_registered_entry(tmp_path, userpkg):
    pipeline = [*FULL[:6], "mylab_chain.mods.Writer()", "mylab_chain.mods.Reader()"]
    assert load(tmp_path, pipeline, ["mylab_chain."]) == []
    errors = load(
        tmp_path, [*FULL[:6], "mylab_chain.mods.Reader()", "mylab_chain.mods.Writer()"], ["mylab_chain."]
    )
    (err,) = errors
    assert "Reader reads mylab_chain/result" in err.message
    from mylab_chain.mods import RESULT

    assert LEVEL2["mylab_chain/result"] is RESULT and RESULT.unit == "K"


def test_undeclared_user_module_warns_and_runs(tmp_path, userpkg, caplog, workspace_factory, tiny_archive):
    with caplog.at_level(logging.WARNING, logger="comap.config"):
        assert load(tmp_path, [CREATE, "mylab_chain.mods.MyNewModule()"], ["mylab_chain."]) == []
    (warning,) = [r.getMessage() for r in caplog.records if "MyNewModule" in r.getMessage()]
    assert "declares no reads or writes" in warning
    ws = workspace_factory(tiny_archive.paths)
    ws.extra_path.append(str(userpkg.parent))
    ws.write_configs(
        [CREATE, "mylab_chain.mods.MyNewModule(output_dir='marks')"], module_paths=["mylab_chain."]
    )
    res = ws.run()
    assert res.returncode == 0, res.stdout + res.stderr
    assert len(list((ws.root / "marks").iterdir())) == len(tiny_archive.paths)


def test_templated_entries_resolve():
    template = LEVEL2.register(
        "mylab_chain_template/{name}/stats", kind="group", description="templated test entry"
    )
    assert isinstance(template, DatasetPath) and template.fields == ("name",)
    assert PostBinCleaning.entry_paths(template, {"name": ["a", "b"]}) == (
        "mylab_chain_template/a/stats",
        "mylab_chain_template/b/stats",
    )
    assert PostBinCleaning.entry_paths(template, {"name": None}) == ()
    module = NoiseStatsLevel2(output_group_name="noise", extra_datasets=["level2/binned_filtered_data"])
    assert module.writes == ("noise/binned_cleaned_data", "noise/binned_data", "noise/binned_filtered_data")
    assert NoiseStatsLevel2.writes == (LEVEL2["level2_noise_stats/{dataset}"],)
    reads = dict(NoiseStatsLevel2.declared_paths("reads", {"unfiltered_dataset": None}))
    assert BINNED_DATA not in reads
    assert CalibratorFitting(calibrator_fit_group_name="fit2").writes == ("level2/fit2",)
