"""B4t — our destriper against TOAST's MapMaker with an Offset template (informative,
docs/mapmaking.md#destriper).

Runs only where ``import toast`` works (TOAST 3.x from PyPI); never install TOAST into the
project venv. To measure it, use a separate environment::

    python3.11 -m venv /tmp/toastenv && /tmp/toastenv/bin/pip install -e /work/main toast
    /tmp/toastenv/bin/python -m benchmarks.run --only B4t

Input: the B4 simulation (:func:`benchmarks.bench_destriper.simulate`): a 200 × 200 map, sky =
broad Gaussians + compact sources at pixel centres, white (σ = 1 mK) + 1/f (f_knee = 1 Hz,
α = −1.5) noise, here with no flagged samples, cut into ``N_DET`` detector streams of
``N_SAMP`` samples, alternately raster-scanned along x and y, all in **one observation**.

Both solve the same problem: offsets of L = 100 samples (``step_time`` = 2 s at 50 Hz) restarting
at each detector's first sample, weights 1/σ² (TOAST: an ``AnalyticNoise`` model whose detector
weight ``1/(NET² f_s)`` equals 1/σ²), no noise prior, an intensity-only map, the same relative
tolerance: ours stops at ‖r‖/‖b‖ < 1e-6, TOAST at ‖r‖²/‖b‖² < ``convergence``, so it gets
``convergence = 1e-12``. TOAST's pixel indices come
from a small pixel-pointing operator that copies the precomputed indices (so neither side pays
for pointing expansion), and its Stokes weights from an operator that writes ones.

Rows: wall time of each solve (median of ``--repeat``; TOAST's includes its binning and
covariance set-up, ours is the whole ``destripe`` call), iterations, and the RMS of
``map − truth`` (monopole removed) over pixels with ≥ 10 hits for both. Target: ours ≥ 5× faster
at equal RMS (within 1 %).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from benchmarks import Result, median
from benchmarks.bench_destriper import FS_HZ, OFFSET_LENGTH, SIGMA_K, simulate
from modules.MapMaking.destriper import destripe

ID = "B4t"
TITLE = "destriper vs TOAST MapMaker + Offset template (same TOD, L = 100, tol 1e-6)"

N_DET = 4
N_SAMP = 500_000
TOL = 1e-6
TARGET_SPEEDUP = 5.0


def _rms_vs_truth(m: np.ndarray, truth: np.ndarray, sel: np.ndarray) -> float:
    r = (m - truth)[sel]
    r = r - r.mean()
    return float(np.sqrt(np.mean(r**2)))


def _toast_setup(sim: dict):
    """Build TOAST data and operators; returns (make_data, make_mapper, read_map)."""
    import astropy.units as u
    import toast
    import toast.ops
    import toast.templates
    from astropy.table import Column, QTable
    from toast.instrument import Focalplane, GroundSite, Telescope
    from toast.noise_sim import AnalyticNoise
    from toast.observation import Observation
    from toast.pixels import PixelDistribution
    from toast.traits import Instance, Int, Unicode

    class PrecomputedPixels(toast.ops.Operator):
        """Pixel pointing from precomputed indices stored in ``ob['precomputed_pixels']``."""

        API = Int(0, help="Internal interface version for this operator")
        pixels = Unicode("pixels", help="Observation detdata key for the output")
        create_dist = Unicode(None, allow_none=True, help="Create the pixel distribution under this key")
        view = Unicode(None, allow_none=True, help="Use this view of the data in all observations")
        detector_pointing = Instance(klass=toast.ops.Operator, allow_none=True, help="(unused)")
        n_pix = Int(0, help="Number of pixels")
        nest = True
        nside = 0

        def _exec(self, data, detectors=None, **kwargs):
            for ob in data.obs:
                dets = ob.select_local_detectors(detectors)
                ob.detdata.ensure(self.pixels, dtype=np.int64, detectors=dets)
                for det in dets:
                    ob.detdata[self.pixels][det, :] = ob["precomputed_pixels"][det]
            if self.create_dist is not None:
                data[self.create_dist] = PixelDistribution(
                    n_pix=self.n_pix, n_submap=1, local_submaps=np.array([0], dtype=np.int32),
                    comm=data.comm.comm_world,
                )  # fmt: skip

        def _finalize(self, data, **kwargs):
            return

        def _requires(self):
            return {"shared": [], "detdata": [], "global": [], "meta": []}

        def _provides(self):
            return {
                "detdata": [self.pixels],
                "global": [] if self.create_dist is None else [self.create_dist],
            }

    class UnitWeights(toast.ops.Operator):
        """Intensity-only Stokes weights: ones."""

        API = Int(0, help="Internal interface version for this operator")
        weights = Unicode("weights", help="Observation detdata key for the output")
        mode = Unicode("I", help="Stokes mode")
        view = Unicode(None, allow_none=True, help="Use this view of the data in all observations")
        hwp_angle = Unicode(None, allow_none=True, help="(unused)")
        detector_pointing = Instance(klass=toast.ops.Operator, allow_none=True, help="(unused)")
        nnz = 1

        def _exec(self, data, detectors=None, **kwargs):
            for ob in data.obs:
                dets = ob.select_local_detectors(detectors)
                ob.detdata.ensure(self.weights, sample_shape=(1,), dtype=np.float64, detectors=dets)
                for det in dets:
                    ob.detdata[self.weights][det, :] = 1.0

        def _finalize(self, data, **kwargs):
            return

        def _requires(self):
            return {"shared": [], "detdata": [], "global": [], "meta": []}

        def _provides(self):
            return {"detdata": [self.weights]}

    dets = [f"D{i:02d}" for i in range(N_DET)]
    net = SIGMA_K / np.sqrt(FS_HZ)  # K sqrt(s): detector weight 1/(NET² f_s) = 1/σ²

    def make_data():
        comm = toast.Comm()
        data = toast.Data(comm)
        table = QTable(
            [
                Column(name="name", data=dets),
                Column(name="quat", data=np.tile([0.0, 0.0, 0.0, 1.0], (N_DET, 1))),
            ]
        )
        fp = Focalplane(detector_data=table, sample_rate=FS_HZ * u.Hz)
        site = GroundSite("OVRO", 37.2338889 * u.deg, -118.2822222 * u.deg, 1222.0 * u.m)
        tele = Telescope("COMAP", focalplane=fp, site=site)
        ob = Observation(comm, tele, n_samples=N_SAMP, name="obs0")
        ob.shared.create_column("times", (N_SAMP,), dtype=np.float64)
        ob.shared["times"].set(np.arange(N_SAMP) / FS_HZ, offset=(0,), fromrank=0)
        ob.shared.create_column("flags", (N_SAMP,), dtype=np.uint8)
        ob.shared["flags"].set(np.zeros(N_SAMP, dtype=np.uint8), offset=(0,), fromrank=0)
        ob.detdata.create("signal", dtype=np.float64, units=u.K)
        ob.detdata.create("flags", dtype=np.uint8)
        pix = {}
        for k, det in enumerate(dets):
            sl = slice(k * N_SAMP, (k + 1) * N_SAMP)
            ob.detdata["signal"][det, :] = sim["tod"][sl]
            pix[det] = sim["pixels"][sl].astype(np.int64)
        ob["precomputed_pixels"] = pix
        ob["noise_model"] = AnalyticNoise(
            detectors=dets,
            rate={d: FS_HZ * u.Hz for d in dets},
            fmin={d: 1e-5 * u.Hz for d in dets},
            fknee={d: 0.0 * u.Hz for d in dets},
            alpha={d: 1.0 for d in dets},
            NET={d: net * u.K * u.s**0.5 for d in dets},
        )
        data.obs.append(ob)
        return data

    def make_mapper():
        pixels = PrecomputedPixels(
            n_pix=sim["n_pixels"], detector_pointing=toast.ops.PointingDetectorSimple()
        )
        weights = UnitWeights(detector_pointing=toast.ops.PointingDetectorSimple())
        binner = toast.ops.BinMap(
            pixel_dist="pixel_dist", pixel_pointing=pixels, stokes_weights=weights, noise_model="noise_model"
        )
        tmpl = toast.templates.Offset(
            times="times",
            noise_model="noise_model",
            step_time=(OFFSET_LENGTH / FS_HZ) * u.second,
            use_noise_prior=False,
            precond_width=1,
        )
        tmatrix = toast.ops.TemplateMatrix(templates=[tmpl])
        mapper = toast.ops.MapMaker(
            name="toastmap",
            det_data="signal",
            binning=binner,
            template_matrix=tmatrix,
            convergence=TOL**2,  # TOAST tests ‖r‖²/‖b‖², we test ‖r‖/‖b‖
            iter_max=1000,
            solve_rcond_threshold=1e-8,
            map_rcond_threshold=1e-8,
            write_hits=False,
            write_map=False,
            write_cov=False,
            write_rcond=False,
            write_binmap=False,
            write_noiseweighted_map=False,
            write_invcov=False,
            keep_final_products=True,
            keep_solver_products=False,
        )
        return mapper

    def read_map(data) -> np.ndarray:
        m = data["toastmap_map"]
        out = np.zeros(sim["n_pixels"])
        out[:] = np.asarray(m.data).reshape(-1)[: sim["n_pixels"]]
        return out

    return make_data, make_mapper, read_map


def run(args: argparse.Namespace) -> list[Result]:
    try:
        import toast
    except ImportError as exc:
        return [Result(ID, "TOAST comparison", None, None, notes=f"skipped: toast is not importable ({exc})")]
    repeat = max(1, int(args.repeat))
    n = N_DET * N_SAMP
    sim = simulate(n, segment=N_SAMP)
    sim["weights"][:] = np.float32(1.0 / SIGMA_K**2)  # no flags in this comparison
    truth = sim["truth"]

    def ours():
        return destripe(
            sim["tod"], sim["pixels"], sim["weights"], OFFSET_LENGTH, sim["n_pixels"], tol=TOL,
            segment_starts=sim["segment_starts"],
        )  # fmt: skip

    make_data, make_mapper, read_map = _toast_setup(sim)
    res = ours()
    ours_t = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        ours()
        ours_t.append(time.perf_counter() - t0)

    # TOAST: data built outside the timing; the timed part is MapMaker.apply (binning, covariance,
    # template set-up, solve, final map).
    toast_t = []
    toast_iter = None
    toast_map = None
    for _ in range(max(1, min(repeat, 3))):
        data = make_data()
        mapper = make_mapper()
        with _CaptureFd(1) as out1, _CaptureFd(2) as out2:
            t0 = time.perf_counter()
            mapper.apply(data)
            toast_t.append(time.perf_counter() - t0)
        toast_map = read_map(data)
        toast_iter = _toast_iterations(out1.text + out2.text)
        del data, mapper

    sel = res.hits >= 10
    rms_ours = _rms_vs_truth(res.map, truth, sel)
    rms_toast = _rms_vs_truth(toast_map, truth, sel)
    rms_naive = _rms_vs_truth(res.naive_map, truth, sel)
    diff = _rms_vs_truth(res.map, toast_map, sel)
    t_ours, t_toast = median(ours_t), median(toast_t)
    speed = t_toast / t_ours
    equal_rms = abs(rms_ours / rms_toast - 1) <= 0.01
    return [
        Result(
            ID,
            f"destripe vs TOAST MapMaker, {N_DET} det x {N_SAMP} samples, L = {OFFSET_LENGTH}",
            t_ours,
            t_toast,
            units="s",
            ratio=speed,
            target=f">= {TARGET_SPEEDUP:.0f}x faster at equal RMS",
            passed=bool(speed >= TARGET_SPEEDUP and equal_rms),
            notes=(
                f"iterations ours {res.n_iter} ({res.status}), TOAST {toast_iter}; RMS vs truth (>= 10 hits, "
                f"monopole removed): ours {rms_ours * 1e3:.4f} mK, TOAST {rms_toast * 1e3:.4f} mK, naive "
                f"{rms_naive * 1e3:.4f} mK; RMS(ours - TOAST) {diff * 1e3:.2e} mK; toast {toast.__version__}"
            ),
            extra={"ours_s": ours_t, "toast_s": toast_t, "rms_ours": rms_ours, "rms_toast": rms_toast},
        )
    ]


def _toast_iterations(log_text: str) -> int | None:
    """Iterations of TOAST's solve, from its log line 'PCG converged after N iterations'."""
    import re

    found = re.findall(r"PCG converged after\s+(\d+) iterations", log_text)
    return int(found[-1]) if found else None


class _CaptureFd:
    """Redirect an OS-level file descriptor (TOAST logs from C++) into a temporary file."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.text = ""

    def __enter__(self) -> _CaptureFd:
        import os
        import sys
        import tempfile

        sys.stdout.flush()
        sys.stderr.flush()
        self._tmp = tempfile.TemporaryFile(mode="w+b")
        self._saved = os.dup(self.fd)
        os.dup2(self._tmp.fileno(), self.fd)
        return self

    def __exit__(self, *exc) -> None:
        import os
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(self._saved, self.fd)
        os.close(self._saved)
        self._tmp.seek(0)
        self.text = self._tmp.read().decode(errors="replace")
        self._tmp.close()
