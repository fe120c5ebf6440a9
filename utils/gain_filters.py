"""Gain filters (docs/level2.md#gainfilterandbin), used by GainFilterAndBin: estimate the common-mode gain
fluctuation ĝ(t) of a feed from all its channels, jointly with a sky level and slope across the 26–34 GHz
band.

Model, per sample t and channel i of one feed (all bands), with ``n_i(t) = d_i(t)/m_i``::

    n_i(t) = ĝ(t)·1 + a0(t)·u_i + a1(t)·u_i·v_i + noise,    u_i = 1/m_i,
    v_i = 2(ν_i − ν_mid)/(ν_max − ν_min),                   ω_i = M_i (m_i/σ_i)²

A gain change scales every channel's power (the constant template); a sky brightness change δT
adds δT/m_i (the templates u and u·v). Because m (≈ Tsys) varies with frequency the two are
separable. With P = [u, u·v] and Ω = diag(ω), the weighted projector onto the sky templates is
Π = P(PᵀΩP)⁻¹PᵀΩ and the joint least-squares gain is ĝ = R/z with

    R(t) = 1ᵀΩ(I − Π) n(t) = Σ_i w_i n_i(t),      w = ω − ΩP(PᵀΩP)⁻¹Pᵀω,      z = Σ_i w_i.

Only the channel weights ``w`` and ``z`` depend on the filter; the per-sample sum R(t) is formed by
the fused kernel (``utils.block_ops.filter_and_bin``) without storing the calibrated block. The
sky terms are not subtracted: continuum signal stays in the data (Deliberate difference 1).

Near-degeneracy: when the system temperature is close to linear across the band, the gain template
is almost a combination of the sky templates, z/Σω is small (≈ 2×10⁻³ for a smooth receiver) and
``R/z`` carries both a large estimator noise and a *leak* of any sky whose spectrum is curved
(amplified by Σω/z). The default filter, :class:`GainFilterDestriped`, therefore does not trust
``R/z`` sample by sample: it solves for slow gain baselines with the scan's own sky marginalised
(:mod:`utils.gain_baselines`, docs/level2.md#gain-baselines) and shrinks them to zero where the data
cannot tell gain from noise.

A user-defined filter subclasses :class:`GainFilter` and implements :meth:`GainFilter.estimate`
(and optionally :meth:`GainFilter.channel_weights`).
"""

from __future__ import annotations

import logging
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from utils.errors import BadCOMAPFile
from utils.gain_baselines import gain_baselines, sky_pixels

log = logging.getLogger("comap.GainFilterAndBin")


@dataclass
class ScanSamples:
    """What a filter may use besides ``R(t)``: the feed's pointing and which samples it may trust.

    Attributes
    ----------
    ra_deg, dec_deg : ndarray, shape (n,)
        ICRS pointing of the feed (deg); NaN where unknown.
    usable : ndarray of bool, shape (n,)
        False where a sample is flagged (``utils.level2.SAMPLE_FLAGS_EXCLUDE``), where a gain-filter
        channel is NaN (``R`` lacks its term, so ``R/z`` is biased there) or on a masked bright
        source.
    seed : int
        Seed for anything random the filter does (deterministic per obsid, feed and scan).
    source_mask : ndarray of bool, shape (n,), or None
        Samples on a masked bright source (sample flag ``FLAG_BRIGHT_SOURCE``); already False in
        ``usable``.
    compact_target : bool
        The observation targets a compact source (a calibrator): outside ``source_mask`` the sky
        is taken as blank.
    """

    ra_deg: NDArray[np.float64]
    dec_deg: NDArray[np.float64]
    usable: NDArray[np.bool_]
    seed: int = 0
    source_mask: NDArray[np.bool_] | None = None
    compact_target: bool = False


def fill_unusable(values: NDArray, usable: NDArray | None) -> NDArray[np.float64]:
    """``values`` with unusable samples replaced by linear interpolation between usable neighbours
    (the nearest usable value beyond the ends; zeros if none is usable)."""
    v = np.asarray(values, dtype=np.float64)
    if usable is None:
        return v
    ok = np.asarray(usable, dtype=bool) & np.isfinite(v)
    if ok.all():
        return v
    if not ok.any():
        return np.zeros_like(v)
    idx = np.arange(v.size)
    return np.interp(idx, idx[ok], v[ok])


def channel_omega(m_k: NDArray, sigma_k: NDArray, mask: NDArray) -> tuple[NDArray[np.bool_], NDArray]:
    """The channels a filter can use and their weights ω_i = (m_i/σ_i)² (0 elsewhere), shape (B, C)."""
    m = np.asarray(m_k, dtype=np.float64)
    s = np.asarray(sigma_k, dtype=np.float64)
    use = np.asarray(mask, dtype=bool) & np.isfinite(m) & (m > 0) & np.isfinite(s) & (s > 0)
    return use, np.where(use, (m / np.where(use, s, 1.0)) ** 2, 0.0)


def omega_sum(m_k: NDArray, sigma_k: NDArray, mask: NDArray) -> float:
    """Σω = Σ (m_i/σ_i)² over the used channels: the precision of ĝ if there were no sky templates."""
    return float(channel_omega(m_k, sigma_k, mask)[1].sum())


@dataclass
class GainEstimate:
    """ĝ(t) of one feed and scan and what the filter used."""

    gain: NDArray[np.float64]
    z: float
    info: dict[str, Any] = field(default_factory=dict)


class GainFilter:
    """Base of gain filters: channel weights from the joint gain + sky-template model.

    Parameters
    ----------
    sky_templates : int
        1 (sky level ``u``) or 2 (level and slope ``u``, ``u·v``).
    """

    def __init__(self, sky_templates: int = 2) -> None:
        if sky_templates not in (1, 2):
            raise ValueError(f"sky_templates must be 1 or 2, got {sky_templates!r}")
        self.sky_templates = int(sky_templates)

    def channel_weights(
        self, m_k: NDArray, sigma_k: NDArray, freq_ghz: NDArray, mask: NDArray
    ) -> tuple[NDArray[np.float64], float]:
        """Weights ``w_i`` of ``n_i = d_i/m_i`` in ``R(t) = Σ w_i n_i(t)``, and ``z = Σ w_i``.

        Parameters
        ----------
        m_k, sigma_k : ndarray, shape (B, C)
            Per-channel normalisation (scan median power, K) and white-noise rms (K).
        freq_ghz : ndarray, shape (B, C)
            Channel frequencies (storage order).
        mask : ndarray of bool, shape (B, C)
            Channels used (False → weight 0).

        Returns
        -------
        w : ndarray, shape (B, C), float64 (0 for masked channels)
        z : float
            ``1ᵀΩ(I − Π)1``; 0 when the gain is degenerate with the sky templates (flat m).
        """
        m = np.asarray(m_k, dtype=np.float64)
        use, omega = channel_omega(m, sigma_k, mask)
        w = np.zeros(m.shape)
        if not use.any():
            return w, 0.0
        freq = np.asarray(freq_ghz, dtype=np.float64)
        fin = np.isfinite(freq)
        fmin, fmax = freq[fin].min(), freq[fin].max()
        v = 2.0 * (freq - 0.5 * (fmin + fmax)) / (fmax - fmin) if fmax > fmin else np.zeros_like(freq)
        u = np.where(use, 1.0 / np.where(use, m, 1.0), 0.0)
        templates = [u, u * v][: self.sky_templates]
        p = np.stack([t[use] for t in templates], axis=1)  # (n_used, k)
        om = omega[use]
        a = p.T @ (om[:, None] * p)
        b = p.T @ om
        coef = np.linalg.lstsq(a, b, rcond=1e-12)[0]
        w_used = om - om * (p @ coef)
        w[use] = w_used
        z = float(w_used.sum())
        if not z > 1e-10 * float(om.sum()):
            return np.zeros(m.shape), 0.0
        return w, z

    def estimate(
        self,
        r_sum: NDArray,
        z: float,
        sample_rate_hz: float,
        *,
        feed: int | None = None,
        samples: ScanSamples | None = None,
    ) -> GainEstimate:
        """ĝ(t) from ``R(t)`` (shape (n,)) and ``z``; ``samples`` gives pointing and usable samples."""
        raise NotImplementedError

    def fit(
        self,
        d_k: NDArray,
        m_k: NDArray,
        sigma_k: NDArray,
        freq_ghz: NDArray,
        mask: NDArray,
        sample_rate_hz: float,
        *,
        feed: int | None = None,
        samples: ScanSamples | None = None,
    ) -> tuple[NDArray, NDArray, dict[str, Any]]:
        """Reference (unfused) form: ĝ(t), the residual ``r = d − m·ĝ`` and the info dict.

        Parameters
        ----------
        d_k : ndarray, shape (B, C, n)
            Calibrated, atmosphere- and level-subtracted data (vane K); NaN allowed.
        m_k, sigma_k, freq_ghz, mask : as :meth:`channel_weights`

        Returns
        -------
        gain : ndarray (n,) float64; residual : ndarray (B, C, n) float32; info : dict
        """
        w, z = self.channel_weights(m_k, sigma_k, freq_ghz, mask)
        m = np.asarray(m_k, dtype=np.float64)
        coeff = np.where(w != 0, w / np.where(np.isfinite(m) & (m > 0), m, 1.0), 0.0)
        d = np.asarray(d_k)
        r_sum = np.einsum("bc,bct->t", coeff, np.where(np.isfinite(d), d, 0.0))
        nan_in_filter = np.einsum(
            "bc,bct->t", (coeff != 0).astype(np.float64), np.isnan(d).astype(np.float64)
        )
        if samples is not None:
            samples = replace(samples, usable=samples.usable & (nan_in_filter == 0))
        elif nan_in_filter.any():
            n = r_sum.size
            samples = ScanSamples(np.full(n, np.nan), np.full(n, np.nan), nan_in_filter == 0)
        est = self.estimate(r_sum, z, sample_rate_hz, feed=feed, samples=samples)
        residual = (d - m[:, :, None] * est.gain[None, None, :]).astype(np.float32)
        return est.gain, residual, {"z": z, **est.info}


class GainFilterBase(GainFilter):
    """Joint weighted least-squares gain per sample: ``ĝ = R/z`` (noise variance 1/z per sample).

    Kept for comparison: it removes part of any sky whose spectrum is curved across the band
    (docs/level2.md#gain-filter-transfer-function). At unusable samples (``samples.usable``) ĝ is
    interpolated from the neighbouring usable ones.
    """

    def estimate(
        self,
        r_sum: NDArray,
        z: float,
        sample_rate_hz: float,
        *,
        feed: int | None = None,
        samples: ScanSamples | None = None,
    ) -> GainEstimate:
        r = np.asarray(r_sum, dtype=np.float64)
        if z <= 0:
            return GainEstimate(np.zeros_like(r), z, {"z": z})
        return GainEstimate(fill_unusable(r / z, None if samples is None else samples.usable), z, {"z": z})


class GainFilterWithPrior(GainFilter):
    """Wiener estimate of ĝ with a 1/f prior ``C(f) = σ_red² |f/f_ref|^α`` (periodogram units).

    Kept selectable; not the default: its 'estimate' prior is fitted to the periodogram of ``R/z``,
    which scan-synchronous sky leaks into (docs/level2.md#gain-filter-transfer-function).

    ``Ĝ(f_k) = R̃(f_k)/(z + 1/C(f_k))`` with ``1/C(0) = ∞``: where gain fluctuations dominate it is
    the base estimate ``R/z``; where they do not it shrinks towards 0 and adds no noise.

    Parameters
    ----------
    prior : {'estimate', 'fixed', 'file'}
        'estimate': fit ``σ_red²|f/f_ref|^α + σ_white²`` to the periodogram of ``R/z`` of the scan
        (``utils.noise.fit_one_over_f``); if the fit fails, α ≥ 0 or σ_red ≤ 0, no gain is removed.
        'fixed': use ``sigma_red`` and ``alpha``. 'file': ``noise_prior_path`` is a TOML file with a
        table per feed, e.g. ``[feed_3] sigma_red = 1.2e-4, alpha = -1.4``.
    noise_prior_path : str or None
    sigma_red : float or None
        Prior amplitude at ``f_ref_hz`` (fractional gain, per sample) for 'fixed'.
    alpha : float or None
    f_ref_hz : float
        Reference frequency of ``σ_red`` (Hz).
    n_psd_bins : int
        Log-spaced periodogram bins for the 'estimate' fit.
    min_fft_samples : int
        Shorter scans fall back to the base estimate.
    min_red_significance : float
        'estimate' only: the fitted red component is used only if it improves the fit of the
        log-binned periodogram over white noise alone by at least this Δχ² (2 extra parameters; 25
        is far beyond what noise gives). Without this test a spurious red fit to pure noise makes the
        Wiener filter pass the lowest frequencies of the estimator noise, which then enters every
        channel as correlated noise scaled by m.
    sky_templates : int
    """

    def __init__(
        self,
        prior: str = "estimate",
        noise_prior_path: str | None = None,
        sigma_red: float | None = None,
        alpha: float | None = None,
        f_ref_hz: float = 0.1,
        n_psd_bins: int = 100,
        min_fft_samples: int = 256,
        min_red_significance: float = 25.0,
        sky_templates: int = 2,
    ) -> None:
        super().__init__(sky_templates)
        if prior not in ("estimate", "fixed", "file"):
            raise ValueError(f"prior must be 'estimate', 'fixed' or 'file', got {prior!r}")
        if prior == "fixed" and (sigma_red is None or alpha is None):
            raise ValueError("prior='fixed' needs sigma_red and alpha")
        if prior == "file" and not noise_prior_path:
            raise ValueError("prior='file' needs noise_prior_path")
        self.prior = prior
        self.noise_prior_path = noise_prior_path
        self.sigma_red = sigma_red
        self.alpha = alpha
        self.f_ref_hz = float(f_ref_hz)
        self.n_psd_bins = int(n_psd_bins)
        self.min_fft_samples = int(min_fft_samples)
        self.min_red_significance = float(min_red_significance)
        self._file_priors: dict[int, tuple[float, float]] | None = None

    def _prior_from_file(self, feed: int | None) -> tuple[float, float]:
        if self._file_priors is None:
            path = Path(str(self.noise_prior_path))
            try:
                raw = tomllib.loads(path.read_text())
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise BadCOMAPFile(f"cannot read gain-filter prior file {path}: {exc}") from None
            priors = {}
            for key, table in raw.items():
                if key.startswith("feed_") and isinstance(table, dict):
                    priors[int(key[5:])] = (float(table["sigma_red"]), float(table["alpha"]))
            self._file_priors = priors
        if feed not in self._file_priors:
            raise BadCOMAPFile(f"gain-filter prior file {self.noise_prior_path} has no [feed_{feed}] table")
        return self._file_priors[feed]

    def estimate(
        self,
        r_sum: NDArray,
        z: float,
        sample_rate_hz: float,
        *,
        feed: int | None = None,
        samples: ScanSamples | None = None,
    ) -> GainEstimate:
        # unusable samples (flags, NaN channels, masked sources) are bridged before the periodogram
        r = fill_unusable(r_sum, None if samples is None else samples.usable)
        n = r.size
        info: dict[str, Any] = {"z": z, "sigma_red": np.nan, "alpha": np.nan, "f_ref_hz": self.f_ref_hz}
        if z <= 0:
            return GainEstimate(np.zeros(n), z, info)
        if n < self.min_fft_samples:
            info["fallback"] = "base"
            return GainEstimate(r / z, z, info)
        if self.prior == "estimate":
            from utils.noise import fit_one_over_f, log_binned_periodogram

            f_b, p_b, n_b = log_binned_periodogram(r / z, sample_rate_hz, self.n_psd_bins)
            fit = fit_one_over_f(f_b, p_b, n_b, f_ref_hz=self.f_ref_hz, sigma_white0=float(np.sqrt(1.0 / z)))
            sigma_red, alpha = fit.sigma_red, fit.alpha
            if not (fit.ok and np.isfinite(sigma_red) and sigma_red > 0 and np.isfinite(alpha) and alpha < 0):
                log.info(
                    "gain prior fit unusable (%s); no gain removed from this scan",
                    fit.message or f"sigma_red={sigma_red}, alpha={alpha}",
                )
                return GainEstimate(np.zeros(n), z, info)
            delta_chi2 = red_significance(f_b, p_b, n_b, fit, self.f_ref_hz)
            info["red_delta_chi2"] = delta_chi2
            if not delta_chi2 >= self.min_red_significance:
                log.debug(
                    "no significant gain fluctuation in this scan (Δχ² = %.1f); no gain removed", delta_chi2
                )
                return GainEstimate(np.zeros(n), z, info)
        elif self.prior == "fixed":
            sigma_red, alpha = float(self.sigma_red), float(self.alpha)
        else:
            sigma_red, alpha = self._prior_from_file(feed)
        info.update(sigma_red=float(sigma_red), alpha=float(alpha))
        freq = np.fft.rfftfreq(n, d=1.0 / sample_rate_hz)
        spec = np.fft.rfft(r)
        gain_spec = np.zeros_like(spec)
        c = sigma_red**2 * np.abs(freq[1:] / self.f_ref_hz) ** alpha
        with np.errstate(divide="ignore", over="ignore"):
            inv_c = np.where(c > 0, 1.0 / c, np.inf)
        gain_spec[1:] = spec[1:] / (z + inv_c)
        return GainEstimate(np.fft.irfft(gain_spec, n=n), z, info)


def red_significance(f_hz: NDArray, p_mean: NDArray, counts: NDArray, fit: Any, f_ref_hz: float) -> float:
    """Δχ² by which the fitted ``σ_red²|f/f_ref|^α + σ_white²`` beats white noise alone on the log-binned
    periodogram (residuals ``sqrt(n_b)·[ln P̄_b − (ψ(n_b) − ln n_b) − ln M]``, unit variance per bin)."""
    from utils.noise import log_mean_bias, one_over_f_model

    n = np.asarray(counts, dtype=np.float64)
    y = np.log(np.asarray(p_mean, dtype=np.float64)) - log_mean_bias(n)
    ln_white = float(np.sum(n * y) / np.sum(n))  # best white level
    chi2_white = float(np.sum(n * (y - ln_white) ** 2))
    model = one_over_f_model(f_hz, fit.sigma_white, fit.sigma_red, fit.alpha, f_ref_hz)
    chi2_red = float(np.sum(n * (y - np.log(model)) ** 2))
    return chi2_white - chi2_red


class GainFilterDestriped(GainFilter):
    """Gain baselines with the scan's sky marginalised and an empirical-Bayes random-walk prior
    (the default; docs/level2.md#gain-baselines).

    ``y = R/z`` is modelled per scan as piecewise-constant gain baselines plus a sky-leak map on the
    feed's own pointing plus white noise; the baselines are solved with the map marginalised, so a
    leak of any spectrum (it is fixed on the sky) does not enter ĝ, and shrunk by a prior whose step
    and level variances are what the data show beyond a pure-noise solution. Unusable samples get
    zero weight; ĝ there is their baseline's value.

    Parameters
    ----------
    baseline_s : float
        Baseline length (s). Gain fluctuations faster than this stay in the data (as correlated
        noise the map maker's offsets and noise model handle).
    pixel_arcmin : float
        Pixel of the leak map (arcmin): a third of the beam FWHM at the top of the band keeps the
        leak's variation within a pixel small.
    sky_model : {'auto', 'scan', 'masked'}
        Where sky may be: 'scan' marginalises a leak map over all the scan's pointing (fields,
        diffuse emission); 'masked' takes the sky outside the masked bright sources as blank, so
        only the masked samples are left out and every other sample constrains the gain (compact
        targets). 'auto' is 'masked' for a compact target with masked samples in the scan, else
        'scan'.
    sky_templates : int
        As :class:`GainFilter`.
    """

    def __init__(
        self,
        baseline_s: float = 1.0,
        pixel_arcmin: float = 1.5,
        sky_model: Literal["auto", "scan", "masked"] = "auto",
        sky_templates: int = 2,
    ) -> None:
        super().__init__(sky_templates)
        if sky_model not in ("auto", "scan", "masked"):
            raise ValueError(f"sky_model must be 'auto', 'scan' or 'masked', got {sky_model!r}")
        self.sky_model = sky_model
        if not (np.isfinite(baseline_s) and baseline_s > 0):
            raise ValueError(f"baseline_s must be > 0, got {baseline_s!r}")
        if not (np.isfinite(pixel_arcmin) and pixel_arcmin > 0):
            raise ValueError(f"pixel_arcmin must be > 0, got {pixel_arcmin!r}")
        self.baseline_s = float(baseline_s)
        self.pixel_arcmin = float(pixel_arcmin)

    def estimate(
        self,
        r_sum: NDArray,
        z: float,
        sample_rate_hz: float,
        *,
        feed: int | None = None,
        samples: ScanSamples | None = None,
    ) -> GainEstimate:
        r = np.asarray(r_sum, dtype=np.float64)
        n = r.size
        info: dict[str, Any] = {"z": z, "sigma_y": np.nan, "sigma_step": np.nan, "sigma_level": np.nan}
        if z <= 0 or n == 0:
            return GainEstimate(np.zeros(n), z, info)
        if samples is None:
            # no pointing: a single pixel, i.e. only the scan mean is marginalised
            pixel = np.zeros(n, dtype=np.int64)
            usable = np.ones(n, dtype=bool)
            seed = 0
        else:
            masked = samples.source_mask is not None and bool(np.any(samples.source_mask))
            model = self.sky_model
            if model == "auto":
                model = "masked" if samples.compact_target and masked else "scan"
            info["sky_model"] = model
            if model == "masked":
                pixel = np.zeros(n, dtype=np.int64)
            else:
                pixel = sky_pixels(samples.ra_deg, samples.dec_deg, self.pixel_arcmin)
                if not (pixel >= 0).any():
                    pixel = np.zeros(n, dtype=np.int64)
            usable = np.asarray(samples.usable, dtype=bool)
            seed = int(samples.seed)
        length = max(int(round(self.baseline_s * sample_rate_hz)), 1)
        sol = gain_baselines(r / z, usable.astype(np.float64), pixel, length, seed=seed)
        info.update(sigma_y=sol.sigma_y, sigma_step=sol.sigma_step, sigma_level=sol.sigma_level)
        return GainEstimate(sol.gain, z, info)


BUILTIN_FILTERS = {
    "GainFilterBase": GainFilterBase,
    "GainFilterWithPrior": GainFilterWithPrior,
    "GainFilterDestriped": GainFilterDestriped,
}
