"""Diagnostic plots (``python -m modules.scripts.diagnostics``) on the test database of test_scripts."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from matplotlib.image import imread
from test_scripts import build_script_db

from modules.scripts import diagnostics
from modules.SQLModule.SQLModule import db
from utils.calibrators import flux_jy


@pytest.fixture(scope="module")
def diag_db(tmp_path_factory):
    return build_script_db(tmp_path_factory.mktemp("diag"))


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("plot", "extra", "points"),
    [
        ("stat-vs-mjd", ["--by", "feed"], 9),  # 3 feeds × 3 observations with statistics
        ("stat-vs-mjd", ["--by", "band", "--stat", "mean_atm_temp", "--feed", "1"], 12),
        ("feed-band-map", [], 12),  # 3 feeds × 4 bands
        ("calibrator", ["--source", "TauA"], 4),  # 2 feeds × 2 observations, band 0, channel 0
        ("source-groups", [], 7),
    ],
)
def test_plots_are_written(plot, extra, points, diag_db, tmp_path, capsys):
    before = digest(diag_db)
    out = tmp_path / "plots" / f"{plot}.png"
    status = diagnostics.main([plot, "--db", str(diag_db), "--out", str(out), *extra])
    assert status == 0
    assert f"({points} point(s))" in capsys.readouterr().out
    image = imread(out)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert np.ptp(image[..., :3]) > 0  # not a blank canvas
    assert not list(out.parent.glob(".*partial*"))
    assert digest(diag_db) == before  # read-only


def test_calibrator_plot_shows_model_and_calibration_model(diag_db):
    args = diagnostics.build_parser().parse_args(["calibrator", "--out", "x.png", "--source", "TauA"])
    db.connect(str(diag_db), create=False, read_only=True)
    try:
        fig, n = diagnostics.plot_calibrator(db, args)
    finally:
        db.disconnect()
    (ax,) = fig.axes
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    model = lines["TauA model at 27.00 GHz"]
    grid = np.asarray(model.get_xdata())
    np.testing.assert_allclose(model.get_ydata(), flux_jy("TauA", 27.0, grid))
    # feed 1 has a 'mean' calibration model with factor 0.9: its line is model × 0.9
    expected = 0.9 * flux_jy("TauA", 27.0, grid)
    scaled = [
        ln
        for ln in ax.get_lines()
        if len(ln.get_ydata()) == grid.size and np.allclose(ln.get_ydata(), expected)
    ]
    assert len(scaled) == 1
    assert n == 4


def test_no_data_usage_and_unreachable(diag_db, tmp_path, capsys):
    out = tmp_path / "empty.png"
    assert (
        diagnostics.main(["stat-vs-mjd", "--db", str(diag_db), "--out", str(out), "--source", "nothing"]) == 0
    )
    assert out.exists() and "no data" in capsys.readouterr().err
    assert (
        diagnostics.main(["feed-band-map", "--db", str(diag_db), "--out", str(out), "--stat", "bogus"]) == 2
    )
    assert "unknown statistic" in capsys.readouterr().err
    assert diagnostics.main(["source-groups", "--db", str(tmp_path / "none.db"), "--out", str(out)]) == 3
    assert diagnostics.main(["no-such-plot", "--out", str(out)]) == 2
