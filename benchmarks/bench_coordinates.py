"""B5 — coordinates: ``azel_to_icrs`` on 10⁶ CES + Lissajous samples against astropy (07 §4, §4.1).

Input: boresight pointing from the simulator's timeline builder (``utils.simulator.scans.build_timeline``,
no TOD is simulated): a GField30 CES observation (20 segments of 500 s at HA ≈ 0, elevation
46–50°) and a Tau A Lissajous observation (10 segments of 1000 s at HA ≈ 0, elevation 66–75°) on
2026-03-01, 50 Hz, including vane events, slews, repoints and every CES turnaround. The first
``N_SAMPLES / 2`` samples of each are concatenated: 10⁶ samples spanning 2 × 2.8 h of real time.

Rows
----
* ``azel_to_icrs`` (median of ``--repeat`` runs) against astropy's full per-sample transform
  ``AltAz(pressure=0) → ICRS`` (``utils.coordinates.azel_to_icrs_astropy``) timed **once** (it takes
  about a minute; an untimed call on 1000 samples first loads the IERS tables). Target ≥ 50×.
* Largest great-circle separation between the two, over all 10⁶ samples (also per scan type).
  Target ≤ 0.1″.
* Peak RSS increase during one call of each (psutil sampling).
* ``icrs_to_azel`` on all samples against astropy ``ICRS → AltAz`` on every 10th sample (the
  astropy cost is linear in the number of samples; the per-sample times are compared), with the
  largest separation on that subset.
* ``parallactic_angle`` on all samples: informative (no baseline).

Both use astropy's bundled IERS tables with downloads off (``configure_iers``), the OVRO site and
no refraction.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from benchmarks import Result, median, peak_rss_during, time_interleaved

ID = "B5"
TITLE = "azel_to_icrs on 10^6 CES + Lissajous samples vs astropy AltAz -> ICRS"

N_SAMPLES = 1_000_000
ICRS_TO_AZEL_SUBSET = 10
TARGET_SPEEDUP = 50.0
TARGET_ERROR_ARCSEC = 0.1


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

    # --- azel_to_icrs: ours (median of repeats), astropy once -------------------------------------
    azel_to_icrs_astropy(az[:1000], el[:1000], mjd[:1000])  # untimed: imports, IERS tables
    times = time_interleaved({"ours": lambda: azel_to_icrs(az, el, mjd)}, repeat=args.repeat, warmup=1)
    ours_s = median(times["ours"])
    (ra, dec), ours_rss = peak_rss_during(lambda: azel_to_icrs(az, el, mjd))
    t0 = time.perf_counter()
    (ra_ref, dec_ref), astropy_rss = peak_rss_during(  # coarse sampling: no GIL pressure on the baseline
        lambda: azel_to_icrs_astropy(az, el, mjd), interval_s=0.05
    )
    astropy_s = time.perf_counter() - t0
    sep_arcsec = angular_separation_deg(ra, dec, ra_ref, dec_ref) * 3600.0
    max_err = float(np.max(sep_arcsec))
    speed = astropy_s / ours_s

    rows = [
        Result(
            ID,
            f"azel_to_icrs, {n:.0e} samples (CES + Lissajous, {span_h:.1f} h)",
            ours_s,
            astropy_s,
            "s",
            speed,
            "astropy/ours",
            f">= {TARGET_SPEEDUP:g}x",
            speed >= TARGET_SPEEDUP,
            f"{ours_s / n * 1e9:.0f} ns/sample vs {astropy_s / n * 1e6:.1f} us/sample; "
            f"ours median of {args.repeat} (range {min(times['ours']):.2f}-{max(times['ours']):.2f} s), "
            f"astropy timed once; inputs built in {t_input:.1f} s",
            extra={"ours_s": times["ours"], "astropy_s": astropy_s},
        ),
        Result(
            ID,
            "azel_to_icrs max great-circle error vs astropy",
            max_err,
            None,
            "arcsec",
            None,
            "-",
            f"<= {TARGET_ERROR_ARCSEC:g} arcsec",
            max_err <= TARGET_ERROR_ARCSEC,
            f"CES max {sep_arcsec[is_ces].max():.4f}, Lissajous max {sep_arcsec[~is_ces].max():.4f}, "
            f"median {np.median(sep_arcsec):.4f}, "
            f"99.9th percentile {np.percentile(sep_arcsec, 99.9):.4f} arcsec",
        ),
        Result(
            ID,
            "azel_to_icrs peak RSS increase during one call",
            ours_rss / 2**20,
            astropy_rss / 2**20,
            "MB",
            astropy_rss / ours_rss if ours_rss > 0 else None,
            "astropy/ours",
            "-",
            None,
            f"{ours_rss / n:.0f} B/sample (per-sample ERFA astrometry records, 248 B each, dominate)",
        ),
    ]

    # --- icrs_to_azel: ours on all samples, astropy on a subset (per-sample comparison) ------------
    sub = slice(None, None, ICRS_TO_AZEL_SUBSET)
    times = time_interleaved({"ours": lambda: icrs_to_azel(ra_ref, dec_ref, mjd)}, repeat=args.repeat)
    inv_s = median(times["ours"])
    az2, el2 = icrs_to_azel(ra_ref[sub], dec_ref[sub], mjd[sub])
    t0 = time.perf_counter()
    az3, el3 = icrs_to_azel_astropy(ra_ref[sub], dec_ref[sub], mjd[sub])
    inv_astropy_s = time.perf_counter() - t0
    n_sub = az3.size
    inv_err = float(np.max(angular_separation_deg(az2, el2, az3, el3)) * 3600.0)
    per_ours, per_astropy = inv_s / n, inv_astropy_s / n_sub
    rows.append(
        Result(
            ID,
            f"icrs_to_azel per sample (ours on {n:.0e}, astropy on {n_sub:.0e})",
            per_ours * 1e9,
            per_astropy * 1e9,
            "ns/sample",
            per_astropy / per_ours,
            "astropy/ours",
            "-",
            None,
            f"ours {inv_s:.2f} s for all samples; max error on the subset {inv_err:.4f} arcsec",
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
