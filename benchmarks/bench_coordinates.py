"""B5 — coordinates: ``azel_to_icrs`` on 10⁶ CES + Lissajous samples against astropy
(docs/operations.md#performance-targets, docs/operations.md#measurement-details).

Input: boresight pointing from the simulator's timeline builder (``utils.simulator.scans.build_timeline``,
no TOD is simulated): a GField30 CES observation (20 segments of 500 s at HA ≈ 0, elevation
46–50°) and a Tau A Lissajous observation (10 segments of 1000 s at HA ≈ 0, elevation 66–75°) on
2026-03-01, 50 Hz, including vane events, slews, repoints and every CES turnaround. The first
``N_SAMPLES / 2`` samples of each are concatenated: 10⁶ samples spanning 2 × 2.8 h of real time.

Baseline: what a user of astropy would pick for speed, ``AltAz(pressure=0) → ICRS`` under
``erfa_astrom.set(ErfaAstromInterpolator(60 * u.s))`` on all samples at once
(``azel_to_icrs_astropy(..., interpolation_s=60)``). Reference for the errors: astropy's full
per-sample transform (no interpolator, ``azel_to_icrs_astropy``), computed once per run (about a
minute, not a baseline for speed).

Rows
----
* ``azel_to_icrs`` against the interpolator baseline, timed alternately in the same run, median of
  ``--repeat`` runs each (after one untimed warm-up of each). Target ≥ 3× at ≤ 0.01″: below it the
  block-ERFA path has no reason to exist and astropy's public API should replace it (issue 8, item 7).
* Largest great-circle separation from the full astropy transform, over all 10⁶ samples, of ours
  and of the baseline (per scan type in the notes). Target ≤ 0.01″ for ours.
* Peak RSS increase during one call of ours, the baseline and the full transform (psutil sampling).
* ``icrs_to_azel`` against the interpolator baseline ``ICRS → AltAz`` on all samples (same run,
  medians), with the largest separation from the full transform on every 10th sample.
* ``parallactic_angle`` on all samples: informative (no baseline).

All use astropy's bundled IERS tables with downloads off (``configure_iers``), the OVRO site and
no refraction.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from benchmarks import Result, median, peak_rss_during, time_interleaved

ID = "B5"
TITLE = "azel_to_icrs on 10^6 CES + Lissajous samples vs astropy with ErfaAstromInterpolator(60 s)"

N_SAMPLES = 1_000_000
ICRS_TO_AZEL_SUBSET = 10
INTERPOLATION_S = 60.0
TARGET_SPEEDUP = 3.0
TARGET_ERROR_ARCSEC = 0.01


def simulator_pointing(n_samples: int = N_SAMPLES) -> dict[str, np.ndarray]:
    """Boresight az/el (deg) and MJD (UTC) of a CES and a Lissajous timeline, n_samples/2 of each.

    Returns
    -------
    dict with ``az_deg``, ``el_deg``, ``mjd`` (each shape (n_samples,)) and ``is_ces`` (bool mask).
    """
    from utils.constants import GROUND_FEED
    from utils.simulator.scans import build_timeline
    from utils.simulator.spec import ObservationSpec, ScanSpec, SkySpec

    half = n_samples // 2
    specs = [
        ObservationSpec(
            obsid=70501,
            source="GField30",
            hour_angle_h=0.0,
            feeds=[1, GROUND_FEED],
            n_channels=16,
            scan=ScanSpec(kind="ces", n_segments=20, segment_s=500.0),
            sky=SkySpec(kind="galactic"),
        ),
        ObservationSpec(
            obsid=70502,
            source="TauA",
            hour_angle_h=0.0,
            feeds=[1, GROUND_FEED],
            n_channels=16,
            scan=ScanSpec(kind="lissajous", n_segments=10, duration_s=1000.0),
            sky=SkySpec(kind="taua"),
        ),
    ]
    az, el, mjd = [], [], []
    for k, spec in enumerate(specs):
        tl = build_timeline(spec)
        n = half if k == 0 else n_samples - half
        if tl.n_tod < n:
            raise RuntimeError(f"timeline of obsid {spec.obsid} has {tl.n_tod} samples, need {n}")
        az.append(tl.az_deg[:n])
        el.append(tl.el_deg[:n])
        mjd.append(tl.mjd[:n])
    is_ces = np.zeros(n_samples, dtype=bool)
    is_ces[:half] = True
    return {
        "az_deg": np.concatenate(az),
        "el_deg": np.concatenate(el),
        "mjd": np.concatenate(mjd),
        "is_ces": is_ces,
    }


def run(args: argparse.Namespace) -> list[Result]:
    from utils.coordinates import (
        angular_separation_deg,
        azel_to_icrs,
        azel_to_icrs_astropy,
        configure_iers,
        icrs_to_azel,
        icrs_to_azel_astropy,
        parallactic_angle,
    )

    configure_iers()
    t0 = time.perf_counter()
    p = simulator_pointing()
    t_input = time.perf_counter() - t0
    az, el, mjd, is_ces = p["az_deg"], p["el_deg"], p["mjd"], p["is_ces"]
    n = az.size
    span_h = (mjd[~is_ces].max() - mjd[~is_ces].min() + mjd[is_ces].max() - mjd[is_ces].min()) * 24.0

    def arcsec(a, b):
        return angular_separation_deg(*a, *b) * 3600.0

    # --- azel_to_icrs: ours against the interpolator, alternately; full astropy once ---------------
    calls = {
        "ours": lambda: azel_to_icrs(az, el, mjd),
        "baseline": lambda: azel_to_icrs_astropy(az, el, mjd, interpolation_s=INTERPOLATION_S),
    }
    times = time_interleaved(calls, repeat=args.repeat, warmup=1)
    ours_s, base_s = median(times["ours"]), median(times["baseline"])
    ours, ours_rss = peak_rss_during(calls["ours"])
    base, base_rss = peak_rss_during(calls["baseline"], interval_s=0.01)
    t0 = time.perf_counter()
    full, full_rss = peak_rss_during(lambda: azel_to_icrs_astropy(az, el, mjd), interval_s=0.05)
    full_s = time.perf_counter() - t0
    err, base_err = arcsec(ours, full), arcsec(base, full)
    max_err, max_base_err = float(err.max()), float(base_err.max())
    speed = base_s / ours_s
    rng = {k: f"{min(v):.2f}-{max(v):.2f} s" for k, v in times.items()}

    rows = [
        Result(
            ID,
            f"azel_to_icrs, {n:.0e} samples (CES + Lissajous, {span_h:.1f} h)",
            ours_s,
            base_s,
            "s",
            speed,
            "baseline/ours",
            f">= {TARGET_SPEEDUP:g}x at <= {TARGET_ERROR_ARCSEC:g} arcsec",
            speed >= TARGET_SPEEDUP and max_err <= TARGET_ERROR_ARCSEC,
            f"baseline: astropy with ErfaAstromInterpolator({INTERPOLATION_S:g} s); medians of {args.repeat} "
            f"alternate runs (ours {rng['ours']}, baseline {rng['baseline']}); full astropy transform "
            f"{full_s:.1f} s (once); inputs built in {t_input:.1f} s",
            extra={"ours_s": times["ours"], "baseline_s": times["baseline"], "full_astropy_s": full_s},
        ),
        Result(
            ID,
            "azel_to_icrs max great-circle error vs full astropy",
            max_err,
            max_base_err,
            "arcsec",
            None,
            "-",
            f"<= {TARGET_ERROR_ARCSEC:g} arcsec",
            max_err <= TARGET_ERROR_ARCSEC,
            f"ours: CES {err[is_ces].max():.4f}, Lissajous {err[~is_ces].max():.4f}, median "
            f"{np.median(err):.4f}; baseline: CES {base_err[is_ces].max():.4f}, Lissajous "
            f"{base_err[~is_ces].max():.4f}, median {np.median(base_err):.4f} arcsec",
        ),
        Result(
            ID,
            "azel_to_icrs peak RSS increase during one call",
            ours_rss / 2**20,
            base_rss / 2**20,
            "MB",
            base_rss / ours_rss if ours_rss > 0 else None,
            "baseline/ours",
            "-",
            None,
            f"full astropy transform {full_rss / 2**20:.0f} MB; ours {ours_rss / n:.0f} B/sample",
        ),
    ]

    # --- icrs_to_azel: ours against the interpolator on all samples; errors on a subset ------------
    ra_ref, dec_ref = full
    calls = {
        "ours": lambda: icrs_to_azel(ra_ref, dec_ref, mjd),
        "baseline": lambda: icrs_to_azel_astropy(ra_ref, dec_ref, mjd, interpolation_s=INTERPOLATION_S),
    }
    times = time_interleaved(calls, repeat=args.repeat, warmup=0)
    inv_s, inv_base_s = median(times["ours"]), median(times["baseline"])
    sub = slice(None, None, ICRS_TO_AZEL_SUBSET)
    full_sub = icrs_to_azel_astropy(ra_ref[sub], dec_ref[sub], mjd[sub])
    inv_err = float(arcsec(icrs_to_azel(ra_ref[sub], dec_ref[sub], mjd[sub]), full_sub).max())
    inv_base_err = float(
        arcsec(
            icrs_to_azel_astropy(ra_ref[sub], dec_ref[sub], mjd[sub], interpolation_s=INTERPOLATION_S),
            full_sub,
        ).max()
    )
    rows.append(
        Result(
            ID,
            f"icrs_to_azel, {n:.0e} samples",
            inv_s,
            inv_base_s,
            "s",
            inv_base_s / inv_s,
            "baseline/ours",
            "-",
            None,
            f"max error vs full astropy on every {ICRS_TO_AZEL_SUBSET}th sample: ours {inv_err:.4f}, "
            f"baseline {inv_base_err:.4f} arcsec",
        )
    )

    # --- parallactic_angle: informative -----------------------------------------------------------
    times = time_interleaved({"ours": lambda: parallactic_angle(ra_ref, dec_ref, mjd)}, repeat=args.repeat)
    pa_s = median(times["ours"])
    rows.append(
        Result(
            ID,
            f"parallactic_angle, {n:.0e} samples",
            pa_s,
            None,
            "s",
            None,
            "-",
            "-",
            None,
            f"{pa_s / n * 1e9:.0f} ns/sample",
        )
    )
    return rows
