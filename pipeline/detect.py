"""Detection stage: negative-sentiment spikes per scope and window, tested against the scope's own baseline.

Method (the same core runs on the database and on the synthetic replay of `finsent alerts evaluate`):

- Each scope (market "*", watchlist entity, source, topic) is a series of per-window counts: n documents
  and k negatives (label "negative"). Market, entity and topic scopes count a story once however many
  sources carry it (distinct content_hash); a source scope counts its own items.
- For the window ending at `as_of`, the baseline is the scope's previous `baseline_days` of windows.
  The negative share p0 comes from the baseline (optionally per time-of-day slot, shrunk halfway to the
  overall share). The share test is the upper tail P(K >= k | n) of a beta-binomial whose over-dispersion
  is estimated from the baseline windows (Pearson chi-square, counted only beyond two standard errors of
  the estimate), i.e. a binomial tail that does not trust news to be independent coin flips.
  Conditioning on n makes it volume-aware: a busy hour needs more negatives than a quiet one, and the
  daily volume cycle cannot fire it. The same test runs on the last 2-4 windows together (p-values
  doubled for the extra scans), and a negative-volume test compares k with the baseline share times the
  hour's usual volume (new negative stories raise n too, which hides part of a spike from the share
  test). All tails are mid-p values, so a few items per window are not tested far below the nominal level.
- A window is "hot" when a p-value <= warning_p and n >= min_volume, k >= min_negative and the share rose
  by at least min_share_increase; critical when p <= critical_p. It is "warm" when p <= EXIT_P and the
  share is above baseline (hysteresis: an episode stays open through warm windows).
- Episodes: a hot window opens one (one alert); it closes after `cooldown_windows` (at least 1)
  consecutive windows that are neither hot nor warm, which emits a "resolved" notice. Re-spikes
  during the cooldown belong to the same episode, unless their evidence is ESCALATE_FACTOR times
  stronger than at the episode's last alert (or they turn a warning episode critical): that sends an
  "escalated" alert, so a real spike right after a false alarm is not swallowed. The episode state at
  `as_of` is recomputed from the data (scanning back to the last quiet run), never from earlier runs, so
  retries and backfills in any order give the same alerts, whose ids hash scope, window and kind.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import stats as sps

from pipeline.config import DetectConfig, FinsentConfig
from pipeline.errors import UsageError
from pipeline.records import AlertItem, AlertKind, AlertRecord
from pipeline.risk import component_arrays, risk_of

if TYPE_CHECKING:
    from sqlalchemy import Engine

log = logging.getLogger(__name__)

EXIT_P = 0.05
ESCALATE_FACTOR = 0.01  # an open episode alerts again when its evidence is 100x stronger than at its last alert
SUSTAINED_WINDOWS = 4
SCAN_CHARGE = 2.0  # multi-window p-values are multiplied by this (a Bonferroni-style charge for scanning)
DISPERSION_SE = 2.0  # over-dispersion is only counted beyond this many standard errors of its estimate
COUNT_GATE_P = 0.2  # the negative-volume test needs the share test at least this small (it is volume-conditional)
MIN_BASELINE_DOCS = 20
TRIM_DAYS = 2  # days of largest negative excess left out of the starting share of the outlier cut
RECENT_WINDOWS = (24, 72)  # spans of the recent shares that p0 follows when they drift up
RECENT_PRIOR_DOCS = 20.0  # weight of the long baseline's share in that recent share
LOOKBACK_WINDOWS = 48
SPARSE_ALPHA_MAX = 0.01  # the largest warning level a scope with few testable windows gets
RHO_MAX = 0.2
OUTLIER_R2 = 9.0
CHI2_1_MEDIAN = 0.4549  # median of a chi-square with one degree of freedom
TRUNCATED_R2_MEAN = 0.9733  # E[Z^2 | Z^2 <= 9] for a standard normal Z
TOP_DOCUMENTS = 5
MARKET = "*"
METHOD = "beta-binomial share test + negative-volume test vs trailing baseline (mid-p)"  # stored in alert details


@dataclass(frozen=True, slots=True)
class DetectorParams:
    """Everything the statistics core needs, taken from DetectConfig plus this module's constants."""

    window_minutes: int
    baseline_windows: int
    min_volume: int
    min_negative: int
    min_share_increase: float
    warning_p: float
    critical_p: float
    cooldown_windows: int
    seasonality: bool
    exit_p: float = EXIT_P
    min_baseline_docs: int = MIN_BASELINE_DOCS
    lookback_windows: int = LOOKBACK_WINDOWS
    sustained_windows: int = SUSTAINED_WINDOWS

    @classmethod
    def from_config(cls, d: DetectConfig, **overrides: Any) -> DetectorParams:
        base = max(1, round(d.baseline_days * 24 * 60 / d.window_minutes))
        values: dict[str, Any] = dict(
            window_minutes=d.window_minutes,
            baseline_windows=base,
            min_volume=d.min_volume,
            min_negative=d.min_negative,
            min_share_increase=d.min_share_increase,
            warning_p=d.warning_p,
            critical_p=d.critical_p,
            cooldown_windows=d.cooldown_windows,
            seasonality=d.seasonality,
        )
        values.update(overrides)
        return cls(**values)

    @property
    def slots_per_day(self) -> int:
        """Time-of-day slots for seasonality; 1 (no seasonality) when windows do not tile a day."""
        if not self.seasonality or (24 * 60) % self.window_minutes:
            return 1
        return (24 * 60) // self.window_minutes

    @property
    def history_windows(self) -> int:
        """Windows of data one decision needs: the lookback plus each of its windows' baselines."""
        return self.baseline_windows + self.lookback_windows + 1

    @property
    def quiet_to_close(self) -> int:
        return max(1, self.cooldown_windows)


@dataclass(slots=True)
class Series:
    """Per-window counts of one scope; index 0 is the oldest window."""

    n: np.ndarray
    k: np.ndarray
    slot: np.ndarray
    sum_p: np.ndarray | None = None  # sum of p_negative, for the risk score
    sum_tw: np.ndarray | None = None  # sum of topic weights over negatives, for the risk score


@dataclass(slots=True)
class SeriesStats:
    """Per-window test results; windows without a full baseline are never hot or warm."""

    p0: np.ndarray
    rho: np.ndarray
    p_value: np.ndarray
    z: np.ndarray
    expected: np.ndarray
    expected_sd: np.ndarray
    baseline_docs: np.ndarray
    hot: np.ndarray
    warm: np.ndarray
    critical: np.ndarray


@dataclass(frozen=True, slots=True)
class Event:
    kind: AlertKind  # a sentiment episode: spike, escalated or resolved
    index: int
    onset: int
    severity: str  # the episode's severity: set at its onset, raised by an escalation


def compute_stats(series: Series, p: DetectorParams) -> SeriesStats:
    """The test for every window of a series at once (one row of baseline windows per target window).

    `series.n`/`series.k` may be 1-D (one scope) or 2-D (scopes x windows, sharing `series.slot`): the
    database path tests thousands of scopes in one pass of array arithmetic instead of a loop per scope.
    """
    n = np.asarray(series.n, dtype=np.float64)
    k = np.asarray(series.k, dtype=np.float64)
    slot = np.asarray(series.slot, dtype=np.int64)
    if n.ndim == 1:
        st = _stats_2d(n[None, :], k[None, :], slot, p)
        return SeriesStats(**{f.name: getattr(st, f.name)[0] for f in fields(SeriesStats)})
    return _stats_2d(n, k, slot, p)


def _stats_2d(n: np.ndarray, k: np.ndarray, slot: np.ndarray, p: DetectorParams) -> SeriesStats:
    """compute_stats on (scopes, windows) arrays; every target window depends only on itself, its
    baseline and its `sustained_windows - 1` predecessors, so any slice long enough gives the same values."""
    R, T = n.shape
    B = p.baseline_windows
    p0 = np.full((R, T), 0.5)
    rho = np.zeros((R, T))
    expected = np.zeros((R, T))
    expected_sd = np.ones((R, T))
    Nb = np.zeros((R, T))
    alpha = np.full((R, T), p.warning_p)
    has_base = np.arange(T) >= B
    if T > B:
        J = T - B
        # Row j holds the B windows before target window B + j.
        Nw = np.lib.stride_tricks.sliding_window_view(n, B, axis=1)[:, :J]
        Kw = np.lib.stride_tricks.sliding_window_view(k, B, axis=1)[:, :J]
        counted = Nw > 0
        p_raw = (Kw.sum(-1) + 0.5) / (Nw.sum(-1) + 1.0)
        pr = _trimmed_share(Nw, Kw, p_raw, p.window_minutes)[..., None]
        Nsafe = np.where(counted, Nw, 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            r2 = np.where(counted, (Kw - Nw * pr) ** 2 / (Nsafe * pr * (1 - pr)), 0.0)
            # Windows far out of line with their baseline (earlier spikes) are left out of p0 and of the
            # dispersion, so one past episode neither hides the next nor inflates the noise estimate. The
            # first cut uses the median residual (earlier spikes inflate a mean, and at a few items a window
            # they are most of the negatives), the second the share and dispersion of what survived it.
            med = _median_where(r2, counted) / CHI2_1_MEDIAN
        kept = counted & (r2 <= OUTLIER_R2 * np.maximum(np.nan_to_num(med, nan=1.0), 1.0)[..., None])
        p1 = ((Kw * kept).sum(-1) + 0.5) / ((Nw * kept).sum(-1) + 1.0)
        pr = p1[..., None]
        with np.errstate(divide="ignore", invalid="ignore"):
            r2 = np.where(counted, (Kw - Nw * pr) ** 2 / (Nsafe * pr * (1 - pr)), 0.0)
        phi1 = np.maximum((r2 * kept).sum(-1) / np.maximum(kept.sum(-1), 1) / TRUNCATED_R2_MEAN, 1.0)
        kept = counted & (r2 <= OUTLIER_R2 * phi1[..., None])
        clean = ~counted | kept
        S = p.slots_per_day
        hour_p: np.ndarray | None = None  # the target hour's share
        dof = np.ones((R, J))  # share of the kept windows' residual variance left after fitting the shares
        rho_p0 = np.zeros((R, J))  # p0's own estimation error, as extra intra-window correlation
        if S > 1:
            # The share by hour of day, shrunk toward the overall share by empirical Bayes: as far as the
            # baseline's hours really differ beyond sampling noise (a scope whose share follows the clock
            # keeps its cycle, one whose hours only differ by chance gets its overall share). Residuals are
            # then taken against the hour's share, so a share cycle does not pass for over-dispersion.
            pad = (-B) % S
            Ns_o, Ks_o = (np.pad(x * kept, ((0, 0), (0, 0), (0, pad))).reshape(R, J, -1, S).sum(-2) for x in (Nw, Kw))
            ps_raw = (Ks_o + 0.5 * p1[..., None]) / (Ns_o + 0.5)
            noise = p1 * (1 - p1) * phi1
            tot = np.maximum(Ns_o.sum(-1), 1.0)
            tau2 = np.maximum(((Ns_o * (ps_raw - p1[..., None]) ** 2).sum(-1) - (S - 1) * noise) / tot, 0.0)
            w = tau2[..., None] / (tau2[..., None] + noise[..., None] / np.maximum(Ns_o, 0.5))
            slot_p = np.clip(p1[..., None] + w * (ps_raw - p1[..., None]), 1e-3, 1 - 1e-3)  # (R, J, S) by offset
            pr = np.tile(slot_p, (1, 1, -(-B // S)))[..., :B]
            dof = np.clip(1 - w.sum(-1) / np.maximum(kept.sum(-1), 1), 0.5, 1.0)
            t_off = B % S  # the target's hour sits at this offset
            hour_p = slot_p[..., t_off]
            # Var(p0) ~ w * phi * p(1-p) / N_hour, i.e. a correlation of w * phi / N_hour among the window's items.
            rho_p0 = w[..., t_off] * phi1 / np.maximum(Ns_o[..., t_off], 1.0)
            with np.errstate(divide="ignore", invalid="ignore"):
                r2 = np.where(counted, (Kw - Nw * pr) ** 2 / (Nsafe * pr * (1 - pr)), 0.0)
        Nk, Kk = (Nw * clean).sum(-1), (Kw * clean).sum(-1)
        Bc = np.maximum(clean.sum(-1), 1)
        p_all = (Kk + 0.5) / (Nk + 1.0)
        M = np.maximum(kept.sum(-1), 1)
        # Mean squared Pearson residual of the kept windows, corrected for the truncation.
        r2k = r2 * kept
        r2m = r2k.sum(-1) / M / dof
        phi = r2m / TRUNCATED_R2_MEAN
        # Only over-dispersion the baseline shows beyond sampling noise counts: at a few items per
        # window the estimate is noisy enough to swallow a real spike.
        r2v = np.maximum((r2k * r2).sum(-1) / M - r2m**2, 0.0)
        phi = np.maximum(phi - DISPERSION_SE * np.sqrt(r2v / M) / TRUNCATED_R2_MEAN, 1.0)
        # E[r^2] = 1 + (n - 1) * rho for a beta-binomial, so the mean of n over the same windows.
        nbar = (Nw * kept).sum(-1) / M
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.where((nbar > 1.5) & (M >= 10), (phi - 1) / (nbar - 1), 0.0)
        lam_all = Kk / Bc
        var_k = np.maximum((Kw * Kw * clean).sum(-1) / Bc - lam_all**2, 0.0)
        if S > 1:
            sl = slot % S
            same = (np.lib.stride_tricks.sliding_window_view(sl, B)[:J] == sl[B:, None]) & clean
            Ks, Ws = (Kw * same).sum(-1), same.sum(-1)
            w0 = Bc / S
            lam = (Ks + w0 * lam_all) / (Ws + w0)
        else:
            lam = lam_all
        base_p = p_all if hour_p is None else hour_p
        # A share that drifted up is the new normal, not a spike: every hour's share rises by the ratio of the
        # last day's share to the long baseline's, times that of the last three days (each shrunk toward the
        # long baseline; only rises count). The product keeps up with a share that rose over three days and is
        # still rising; it over-corrects a drift that has settled until the long baseline catches up (on the
        # drift test's 40 streams a plain maximum of the two ratios alerted 1.6x as often as on quiet data).
        # Those shares count windows that are not clean (a drift makes the newest windows outliers against the
        # long baseline), short of the last few that a multi-window spike may still be part of, but not windows
        # far out of line with the recent share itself (an earlier surge: in spiked data one every few days),
        # or a surge three days ago would raise the bar for the next one.
        hi = B - p.sustained_windows
        ratios = []
        for span in RECENT_WINDOWS:
            lo = max(0, hi - span)
            Nr, Kr = Nw[..., lo:hi], Kw[..., lo:hi]
            pr = ((Kr.sum(-1) + RECENT_PRIOR_DOCS * p_all) / (Nr.sum(-1) + RECENT_PRIOR_DOCS))[..., None]
            with np.errstate(divide="ignore", invalid="ignore"):
                r2r = (Kr - Nr * pr) ** 2 / (np.maximum(Nr, 1) * pr * (1 - pr))
            inl = r2r <= OUTLIER_R2 * phi1[..., None]
            Nr, Kr = Nr * inl, Kr * inl
            ratios.append((Kr.sum(-1) + RECENT_PRIOR_DOCS * p_all) / (Nr.sum(-1) + RECENT_PRIOR_DOCS) / p_all)
        factor = np.prod([np.maximum(r, 1.0) for r in ratios], axis=0)
        base_p = base_p * factor  # a drift scales every hour's share alike
        # The false-alert budget is per scope and week: a scope whose windows rarely reach min_volume spends
        # it on few tests, so each of its windows is tested at warning_p over the share of baseline windows
        # that reach it (at most SPARSE_ALPHA_MAX). Busy scopes keep warning_p, and so does a window whose
        # other (non-negative) items alone are far above the usual: a news day makes a quiet scope testable
        # for a few hours, a surge of negative items does not raise the others.
        testable = (Nw >= p.min_volume).mean(-1)
        top = max(SPARSE_ALPHA_MAX, p.warning_p)
        usual = (Nw - Kw).mean(-1)
        newsy = n[:, B:] - k[:, B:] > usual + 3 * np.sqrt(usual) + 1
        alpha[:, B:] = np.where(newsy, p.warning_p, np.clip(p.warning_p / np.maximum(testable, 1e-9), p.warning_p, top))
        p0[:, B:] = base_p
        rho[:, B:] = np.clip(np.nan_to_num(r) + rho_p0, 0.0, RHO_MAX)
        expected[:, B:] = lam
        expected_sd[:, B:] = np.sqrt(np.maximum(var_k, lam))
        Nb[:, B:] = Nk
    p0 = np.clip(p0, 1e-4, 1 - 1e-4)

    ok = has_base & (Nb >= p.min_baseline_docs)
    pv, z, hot = _tail_test(n, k, p0, rho, ok, p, alpha)
    if T > B:
        pc = _count_test(n, k, p0, B, p.window_minutes)
        hotc = _passes(n, k, p0, ok & (pv <= COUNT_GATE_P), pc, p, alpha)
        new = hotc & ~hot
        pv, hot = np.where(new, pc, pv), hot | hotc
    warm = ok & (n > 0) & (k > n * p0) & (pv <= p.exit_p)
    for m in range(2, p.sustained_windows + 1):
        # The same test on the last m windows together catches a spike spread over several windows
        # that no single window shows; the current window must itself be above baseline.
        nm, km, ex = n.copy(), k.copy(), n * p0
        exm, okm = ex.copy(), ok & warm
        for lag in range(1, m):
            nm[:, lag:] += n[:, :-lag]
            km[:, lag:] += k[:, :-lag]
            exm[:, lag:] += ex[:, :-lag]
            okm[:, :lag] = False
            okm[:, lag:] &= ok[:, :-lag]
        p0m = np.where(nm > 0, exm / np.where(nm > 0, nm, 1), p0)
        pvm, zm, hotm = _tail_test(nm, km, p0m, rho, okm, p, alpha, charge=SCAN_CHARGE)
        new = hotm & ~hot
        pv, z, hot = np.where(new, pvm, pv), np.where(new, zm, z), hot | hotm
    return SeriesStats(
        p0=p0,
        rho=rho,
        p_value=pv,
        z=z,
        expected=expected,
        expected_sd=expected_sd,
        baseline_docs=Nb,
        hot=hot,
        warm=warm | hot,
        critical=hot & (pv <= p.critical_p),
    )


def _median_where(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Median of x over the last axis where mask holds (nan where it never does); np.nanmedian goes
    through masked arrays and costs several times more."""
    v = np.sort(np.where(mask, x, np.inf), axis=-1)
    c = mask.sum(-1)
    lo = np.take_along_axis(v, np.maximum((c - 1) // 2, 0)[..., None], -1)[..., 0]
    hi = np.take_along_axis(v, np.maximum(c // 2 - (c == 0), 0)[..., None], -1)[..., 0]
    return np.where(c > 0, (lo + hi) / 2, np.nan)


def _trimmed_share(Nw: np.ndarray, Kw: np.ndarray, p_raw: np.ndarray, window_minutes: int) -> np.ndarray:
    """A starting share for the outlier cut that earlier spikes cannot drag up: the baseline's share
    without its TRIM_DAYS days of largest negative excess. At a few items an hour two spikes a week are
    half the baseline's negatives and look like ordinary windows at the share they inflated."""
    D = (24 * 60) // window_minutes
    B = Nw.shape[-1]
    nb = B // D if D else 0
    if nb < 5:
        return p_raw
    shape = (*Nw.shape[:-1], nb, D)
    Nd, Kd = Nw[..., B - nb * D :].reshape(shape).sum(-1), Kw[..., B - nb * D :].reshape(shape).sum(-1)
    excess = Kd - p_raw[..., None] * Nd
    keep = np.ones(Nd.shape, dtype=bool)
    np.put_along_axis(keep, np.argsort(excess, axis=-1)[..., -TRIM_DAYS:], False, axis=-1)
    return ((Kd * keep).sum(-1) + 0.5) / ((Nd * keep).sum(-1) + 1.0)


def _count_test(n: np.ndarray, k: np.ndarray, p0: np.ndarray, B: int, window_minutes: int) -> np.ndarray:
    """Negative volume against its time-of-day expectation: mid-p upper tail of a negative binomial.

    Expected negatives = baseline share x the mean volume of the same time-of-day slot in the baseline;
    the volume's Gamma-Poisson dispersion is estimated from the baseline around those slot means, and the
    slot mean's own sampling error is added to the variance. A spike of new negative items raises n as
    well as k, which hides part of it from the share test; at a few items per window this test sees it.
    Arrays are (scopes, windows) of consecutive windows.
    """
    R, T = n.shape
    J = T - B
    out = np.ones((R, T))
    S = (24 * 60) // window_minutes if (24 * 60) % window_minutes == 0 else 1
    Nw = np.lib.stride_tricks.sliding_window_view(n, B, axis=1)[:, :J]
    # Slot means of each target's baseline, by offset b < S from the baseline's first window (windows are
    # consecutive, so offset b holds one slot): running sums along each slot's own windows, differenced.
    M = -(-T // S)
    cs = np.pad(n, ((0, 0), (0, M * S - T))).reshape(R, M, S).cumsum(1).reshape(R, M * S)
    off = np.arange(S)
    cnt = np.maximum(-(-(B - off) // S), 0)  # baseline windows at each offset
    first = np.arange(J)[:, None] + off  # (J, S)
    last = first + np.maximum(cnt - 1, 0) * S
    below = np.where(first >= S, cs[:, np.maximum(first - S, 0)], 0.0)
    smean = np.where(cnt > 0, (cs[:, np.minimum(last, M * S - 1)] - below) / np.maximum(cnt, 1), 0.0)  # (R, J, S)
    m_j = np.tile(smean, (1, 1, -(-B // S)))[..., :B]
    with np.errstate(divide="ignore", invalid="ignore"):
        inv_r = np.where(m_j > 0, ((Nw - m_j) ** 2 - m_j) / np.maximum(m_j, 1e-9) ** 2, 0.0)
    c = max(int(cnt.min()), 2)
    inv_r = np.maximum(inv_r.mean(-1) * c / (c - 1), 1e-3)
    pb = p0[:, B:]
    # Volume-conditional: the volume the window's non-negative items imply, when above the usual volume
    # (a news day brings more of every kind of item; a negative surge leaves the others as they were). It
    # is taken a little low (up to 2 SD, at most 4 items) so that a few extra items in a quiet hour still
    # count against the usual volume.
    others = n[:, B:] - k[:, B:]
    implied = np.maximum(others - np.minimum(2 * np.sqrt(others), 4.0), 0.0) / (1 - pb)
    nexp = np.maximum(np.maximum(smean[:, :, B % S], 0.1), implied)  # the target's slot sits at offset B % S
    lam = np.maximum(pb * nexp, 0.05)
    var = lam + lam**2 * inv_r + pb**2 * (nexp + nexp**2 * inv_r) / c
    phi = var / lam
    size, prob = lam / np.maximum(phi - 1, 1e-9), 1 / phi
    kk = k[:, B:].astype(np.int64)
    pc = sps.nbinom.sf(kk - 1, size, prob) - 0.5 * sps.nbinom.pmf(kk, size, prob)
    out[:, B:] = np.clip(np.nan_to_num(pc, nan=1.0), 0.0, 1.0)
    return out


def share_tail_p(n: np.ndarray, k: np.ndarray, p0: np.ndarray, rho: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """Mid-p upper tail P(K >= k | n) of a beta-binomial with mean share p0 and intra-window correlation rho
    (a binomial where rho is negligible); 1 where `ok` is false or there is nothing to test. The evaluation's
    oracle runs the same tail with the generator's true share and noise."""
    ni, ki = n.astype(np.int64), k.astype(np.int64)
    pv = np.ones(n.shape)
    use = ok & (ni > 0) & (ki > 0)
    if use.any():
        nu, ku, pu, ru = ni[use], ki[use], p0[use], rho[use]
        binom_tail = sps.binom.sf(ku - 1, nu, pu)
        r = np.maximum(ru, 1e-9)
        a, b = pu * (1 / r - 1), (1 - pu) * (1 / r - 1)
        bb_tail = sps.betabinom.sf(ku - 1, nu, a, b)
        half = np.where(ru > 1e-4, sps.betabinom.pmf(ku, nu, a, b), sps.binom.pmf(ku, nu, pu))
        pv[use] = np.where(ru > 1e-4, bb_tail, binom_tail) - 0.5 * half
    return np.clip(np.nan_to_num(pv, nan=1.0), 0.0, 1.0)


def _tail_test(
    n: np.ndarray,
    k: np.ndarray,
    p0: np.ndarray,
    rho: np.ndarray,
    ok: np.ndarray,
    p: DetectorParams,
    alpha: np.ndarray,
    charge: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Beta-binomial upper tail P(K >= k | n) as a mid-p value (P(K > k) + P(K = k) / 2, so that a few
    items per window are not tested far below the nominal level), its z-score, and whether each window
    passes every gate."""
    pv = np.clip(share_tail_p(n, k, p0, rho, ok) * charge, 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        sd = np.sqrt(n * p0 * (1 - p0) * (1 + np.maximum(n - 1, 0) * rho))
        z = np.nan_to_num(np.where(sd > 0, (k - n * p0) / sd, 0.0))
    return pv, z, _passes(n, k, p0, ok, pv, p, alpha)


def _passes(
    n: np.ndarray, k: np.ndarray, p0: np.ndarray, ok: np.ndarray, pv: np.ndarray, p: DetectorParams, alpha: np.ndarray
) -> np.ndarray:
    """The gates every test shares (`volume_gates`) and p <= alpha (the window's warning level)."""
    return ok & volume_gates(n, k, p0, p) & (pv <= alpha)


def volume_gates(n: np.ndarray, k: np.ndarray, p0: np.ndarray, p: DetectorParams) -> np.ndarray:
    """Enough items and negatives and a real rise in share over p0: what a window needs before any p-value
    counts (the evaluation's oracle applies the same gates)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(n > 0, k / np.where(n > 0, n, 1), 0.0)
    return (n >= p.min_volume) & (k >= p.min_negative) & (share - p0 >= p.min_share_increase)


def event_at(st: SeriesStats, t: int, p: DetectorParams) -> Event | None:
    """The spike or resolved event at window t, replaying the episode state from the last quiet run."""
    C = p.quiet_to_close
    lo = max(0, t - p.lookback_windows)
    start, run = lo, 0
    for j in range(t - 1, lo - 1, -1):
        if st.warm[j]:
            run = 0
            continue
        run += 1
        if run >= C:
            start = j + C
            break
    open_, onset, quiet, sev, last_p = False, -1, 0, "warning", 1.0
    for i in range(start, t + 1):
        if not open_:
            if st.hot[i]:
                open_, onset, quiet = True, i, 0
                sev = "critical" if st.critical[i] else "warning"
                last_p = float(st.p_value[i])
                if i == t:
                    return Event(AlertKind.SPIKE, t, t, sev)
        elif st.warm[i]:
            quiet = 0
            if st.hot[i] and (
                float(st.p_value[i]) <= last_p * ESCALATE_FACTOR or (st.critical[i] and sev == "warning")
            ):
                last_p = float(st.p_value[i])
                sev = "critical" if st.critical[i] else sev
                if i == t:
                    return Event(AlertKind.ESCALATED, t, onset, sev)
        else:
            quiet += 1
            if quiet >= C:
                open_ = False
                if i == t:
                    return Event(AlertKind.RESOLVED, t, onset, sev)
    return None


def alert_id(scope_kind: str, scope_value: str, window_start: datetime, window_end: datetime, kind: str) -> str:
    key = (
        f"v1|{scope_kind}|{scope_value}|{window_start.astimezone(UTC).isoformat()}"
        f"|{window_end.astimezone(UTC).isoformat()}|{kind}"
    )
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def episode_id(scope_kind: str, scope_value: str, onset_start: datetime) -> str:
    return hashlib.sha256(
        f"v1|episode|{scope_kind}|{scope_value}|{onset_start.astimezone(UTC).isoformat()}".encode()
    ).hexdigest()[:32]


# --- the window grid and the scope matrix ---------------------------------------------------------------


class OffGridError(UsageError, ValueError):
    """A detection time that is naive or not a window end of the epoch-aligned grid."""


def window_end(now: datetime, window_minutes: int) -> datetime:
    """The end of the last complete window at `now` (windows are aligned to the epoch)."""
    step = window_minutes * 60
    return datetime.fromtimestamp(int(now.timestamp()) // step * step, UTC)


def check_as_of(as_of: datetime, window_minutes: int) -> None:
    """Reject an off-grid detection time before any work is done, naming the nearest valid ones."""
    if as_of.tzinfo is None:
        raise OffGridError(f"as-of time {as_of.isoformat()} has no timezone: give UTC, e.g. {as_of.isoformat()}Z")
    before = window_end(as_of, window_minutes)
    if before != as_of:
        after = before + timedelta(minutes=window_minutes)
        raise OffGridError(
            f"as-of time {as_of.isoformat()} is not on the {window_minutes}-minute window grid: "
            f"use {before:%Y-%m-%dT%H:%MZ} or {after:%Y-%m-%dT%H:%MZ}"
        )


@dataclass(frozen=True, slots=True)
class WindowGrid:
    """`windows` consecutive windows of `window_minutes` ending at `end`: the one place where window indices
    become times and back (index 0 is the oldest window, `last` the one ending at `end`)."""

    end: datetime
    windows: int
    window_minutes: int

    @classmethod
    def ending_at(cls, as_of: datetime, windows: int, window_minutes: int) -> WindowGrid:
        """The grid for a decision at `as_of`, which must be an aware window end (OffGridError otherwise)."""
        check_as_of(as_of, window_minutes)
        return cls(as_of, windows, window_minutes)

    @property
    def step(self) -> timedelta:
        return timedelta(minutes=self.window_minutes)

    @property
    def start(self) -> datetime:
        return self.end - self.windows * self.step

    @property
    def last(self) -> int:
        return self.windows - 1

    def window(self, i: int) -> tuple[datetime, datetime]:
        """[start, end) of window i."""
        lo = self.start + i * self.step
        return lo, lo + self.step

    def index_of_epoch(self, seconds: np.ndarray) -> np.ndarray:
        """Window index of each UTC epoch second (outside [0, windows) when off the grid's span)."""
        return (seconds - int(self.start.timestamp())) // (self.window_minutes * 60)

    def slots(self) -> np.ndarray:
        """Time-of-day slot (UTC) of each window's start."""
        per_day = max(1, 86400 // (self.window_minutes * 60))
        first = int(self.start.timestamp()) % 86400 // (self.window_minutes * 60)
        return (first + np.arange(self.windows)) % per_day


@dataclass(slots=True)
class ScopeMatrix:
    """Per-window counts of many scopes as (scopes, windows) arrays; row i belongs to keys[i] (sorted)."""

    keys: list[tuple[str, str]]
    n: np.ndarray
    k: np.ndarray
    sum_p: np.ndarray  # sum of p_negative, for the risk score
    sum_tw: np.ndarray  # sum of topic weights over negatives, for the risk score
    slot: np.ndarray

    @classmethod
    def zeros(cls, keys: list[tuple[str, str]], grid: WindowGrid) -> ScopeMatrix:
        shape = (len(keys), grid.windows)
        return cls(keys, np.zeros(shape), np.zeros(shape), np.zeros(shape), np.zeros(shape), grid.slots())

    def series(self, i: int) -> Series:
        return Series(n=self.n[i], k=self.k[i], slot=self.slot, sum_p=self.sum_p[i], sum_tw=self.sum_tw[i])


def scan_matrix(
    mat: ScopeMatrix, t: int, p: DetectorParams, block: int = 2000
) -> tuple[SeriesStats, dict[int, tuple[Event, SeriesStats]]]:
    """Window t's statistics for every scope (for the risk rows) and the events at t, by row.

    Scopes with no items in the whole history are skipped (they can neither alert nor resolve). The rest
    are tested in blocks on the shortest slice that gives window t and window t - cooldown their exact
    values; only scopes hot at t (a spike or an escalation) or warm `cooldown` windows ago (a resolution)
    get the full history and the episode replay of `event_at`.
    """
    R = mat.n.shape[0]
    C = p.quiet_to_close
    now = SeriesStats(
        p0=np.full(R, 0.5),
        rho=np.zeros(R),
        p_value=np.ones(R),
        z=np.zeros(R),
        expected=np.zeros(R),
        expected_sd=np.zeros(R),
        baseline_docs=np.zeros(R),
        hot=np.zeros(R, dtype=bool),
        warm=np.zeros(R, dtype=bool),
        critical=np.zeros(R, dtype=bool),
    )
    active = np.flatnonzero(mat.n[:, : t + 1].any(1))
    a = max(0, t - C - p.baseline_windows - (p.sustained_windows - 1))
    candidates: list[np.ndarray] = []
    for lo in range(0, len(active), block):
        rows = active[lo : lo + block]
        st = compute_stats(Series(n=mat.n[rows, a : t + 1], k=mat.k[rows, a : t + 1], slot=mat.slot[a : t + 1]), p)
        for f in fields(SeriesStats):
            getattr(now, f.name)[rows] = getattr(st, f.name)[:, t - a]
        cand = st.hot[:, t - a]
        if t - C - a >= 0:
            cand = cand | st.warm[:, t - C - a]
        candidates.append(rows[cand])
    events: dict[int, tuple[Event, SeriesStats]] = {}
    rows = np.concatenate(candidates) if candidates else np.zeros(0, dtype=np.int64)
    for lo in range(0, len(rows), block):
        part = rows[lo : lo + block]
        full = compute_stats(Series(n=mat.n[part, : t + 1], k=mat.k[part, : t + 1], slot=mat.slot[: t + 1]), p)
        for j, i in enumerate(part):
            one = SeriesStats(**{f.name: getattr(full, f.name)[j] for f in fields(SeriesStats)})
            ev = event_at(one, t, p)
            if ev is not None:
                events[int(i)] = (ev, one)
    return now, events


# --- the decision at one window ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Finding:
    """One scope's event at the decision window: what its alert reports."""

    scope_kind: str
    scope_value: str
    event: Event
    stats: SeriesStats  # the scope's statistics over the whole history, window `grid.last` last
    n: int
    k: int
    risk: float

    def record(self, grid: WindowGrid, top_documents: tuple[AlertItem, ...] = ()) -> AlertRecord:
        t = grid.last
        w_start, w_end = grid.window(t)
        resolved = self.event.kind == AlertKind.RESOLVED
        return AlertRecord(
            id=alert_id(self.scope_kind, self.scope_value, w_start, w_end, self.event.kind),
            scope_kind=self.scope_kind,
            scope_value=self.scope_value,
            window_start=w_start,
            window_end=w_end,
            kind=self.event.kind,
            severity="info" if resolved else self.event.severity,
            neg_count=self.k,
            total_count=self.n,
            neg_share=self.k / self.n if self.n else 0.0,
            baseline_share=float(self.stats.p0[t]),
            baseline_neg_rate=float(self.stats.expected[t]),
            statistic=float(self.stats.z[t]),
            p_value=float(self.stats.p_value[t]),
            risk_score=self.risk,
            top_documents=() if resolved else top_documents,
            episode_id=episode_id(self.scope_kind, self.scope_value, grid.window(self.event.onset)[0]),
        )

    def details(self, grid: WindowGrid, model_version: str, p: DetectorParams) -> dict[str, Any]:
        """What the alert row keeps beside its columns (store.alerts adds the cited documents)."""
        return {
            "model_version": model_version,
            "episode_severity": self.event.severity,
            "episode_onset": grid.window(self.event.onset)[0].isoformat(),
            "detector": {
                "method": METHOD,
                "window_minutes": p.window_minutes,
                "baseline_windows": p.baseline_windows,
                "warning_p": p.warning_p,
                "critical_p": p.critical_p,
                "exit_p": p.exit_p,
                "seasonality": p.seasonality,
            },
        }


def risk_scores(
    mat: ScopeMatrix, now: SeriesStats, t: int, model_version: str
) -> tuple[np.ndarray, list[tuple[tuple[str, str], dict[str, Any]]]]:
    """Every scope's risk score at window t, and the components stored beside it (vectorised over scopes)."""
    n, k = mat.n[:, t], mat.k[:, t]
    intensity, anomaly, topic = component_arrays(
        n, k, mat.sum_p[:, t], mat.sum_tw[:, t], now.p0, now.expected, now.expected_sd
    )
    risk = risk_of(intensity, anomaly, topic)
    columns: dict[str, list[Any]] = {
        "intensity": np.round(intensity, 4).tolist(),
        "anomaly": np.round(anomaly, 4).tolist(),
        "topic_severity": np.round(topic, 4).tolist(),
        "risk": risk.tolist(),
        "n": n.astype(np.int64).tolist(),
        "negatives": k.astype(np.int64).tolist(),
        "expected_negatives": np.round(now.expected, 4).tolist(),
        "baseline_share": np.round(now.p0, 4).tolist(),
        "p_value": now.p_value.tolist(),
    }
    rows = [
        (key, {**{name: values[i] for name, values in columns.items()}, "model_version": model_version})
        for i, key in enumerate(mat.keys)
    ]
    return risk, rows


def detect_spikes(
    engine: Engine,
    cfg: FinsentConfig,
    as_of: datetime,
    model_version: str,
    scorer: Any = None,
    *,
    explain: bool = True,
) -> list[AlertRecord]:
    """Alerts (spikes, escalations and resolutions) for the window ending at `as_of`; stores them and every
    scope's risk score. The stage composes three parts: counts in and rows out (pipeline.store.alerts), the
    statistics and the decision (this module, no database), and the evidence words (pipeline.explain).

    Idempotent: a retry or backfill of the same window stores nothing new and returns the same alerts.
    Evidence tokens are read from the `explanations` stored at scoring time; the model is never loaded
    here. `scorer` (optional, already loaded by the caller) explains documents stored without evidence.
    """
    from pipeline.explain import with_evidence
    from pipeline.store import alerts as stored
    from pipeline.store import load_explanations, session_scope

    p = DetectorParams.from_config(cfg.detect)
    grid = WindowGrid.ending_at(as_of, p.history_windows, p.window_minutes)
    t = grid.last
    with session_scope(engine) as session:
        mat = stored.load_scope_counts(session, cfg, model_version, grid)
    now_t, events = scan_matrix(mat, t, p)
    risk, scores = risk_scores(mat, now_t, t, model_version)
    found = [
        Finding(*mat.keys[i], ev, st, int(mat.n[i, t]), int(mat.k[i, t]), float(risk[i]))
        for i, (ev, st) in sorted(events.items())
    ]
    cited = [(f.scope_kind, f.scope_value) for f in found if f.event.kind != AlertKind.RESOLVED]
    with session_scope(engine) as session:
        stored.save_risk_scores(session, *grid.window(t), scores)
        tops = stored.top_documents(session, cited, model_version, *grid.window(t))
        evidence = (
            load_explanations(session, model_version, (i.document_id for docs in tops.values() for i, _ in docs))
            if explain and any(tops.values())
            else {}
        )
    # Every watched name is left out of evidence (whichever scope cites the document).
    names = [x for w in cfg.watchlist for x in (w.name, w.ticker, *w.aliases)]
    alerts = [
        (
            f.record(
                grid,
                with_evidence(
                    tops.get((f.scope_kind, f.scope_value), []), evidence, scorer if explain else None, names
                ),
            ),
            f.details(grid, model_version, p),
        )
        for f in found
    ]
    with session_scope(engine) as session:
        stored.save_alerts(session, alerts)
    for r, _ in alerts:
        log.info(
            "%s %s %s=%s window %s: %d/%d negative (baseline share %.1f%%), p=%.2g, risk %.0f",
            r.kind, r.severity, r.scope_kind, r.scope_value, r.window_end.isoformat(), r.neg_count,
            r.total_count, 100 * r.baseline_share, r.p_value or 1.0, r.risk_score or 0.0,
        )  # fmt: skip
    return [r for r, _ in alerts]
