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
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps
from sqlalchemy import BigInteger, Engine, cast, func, select
from sqlalchemy.orm import Session

from pipeline.config import DetectConfig, FinsentConfig
from pipeline.records import AlertItem, AlertRecord, document_text
from pipeline.risk import RiskComponents, risk_components, topic_weight
from pipeline.store import _insert, load_explanations, session_scope
from pipeline.store import schema as s

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
SLOT_PRIOR_DOCS = 20.0  # least weight of the overall share in an hour-of-day share
RECENT_PRIOR_DOCS = 20.0  # weight of the long baseline's share in that recent share
LOOKBACK_WINDOWS = 48
RHO_MAX = 0.2
OUTLIER_R2 = 9.0
CHI2_1_MEDIAN = 0.4549  # median of a chi-square with one degree of freedom
TRUNCATED_R2_MEAN = 0.9733  # E[Z^2 | Z^2 <= 9] for a standard normal Z
TOP_DOCUMENTS = 5
EVIDENCE_TOKENS = 5
MARKET = "*"


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
    kind: str  # spike | escalated | resolved
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
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # a baseline without items has no median
                med = np.nanmedian(np.where(counted, r2, np.nan), axis=-1) / CHI2_1_MEDIAN
        kept = counted & (r2 <= OUTLIER_R2 * np.maximum(np.nan_to_num(med, nan=1.0), 1.0)[..., None])
        p1 = ((Kw * kept).sum(-1) + 0.5) / ((Nw * kept).sum(-1) + 1.0)
        pr = p1[..., None]
        with np.errstate(divide="ignore", invalid="ignore"):
            r2 = np.where(counted, (Kw - Nw * pr) ** 2 / (Nsafe * pr * (1 - pr)), 0.0)
        phi1 = np.maximum((r2 * kept).sum(-1) / np.maximum(kept.sum(-1), 1) / TRUNCATED_R2_MEAN, 1.0)
        kept = counted & (r2 <= OUTLIER_R2 * phi1[..., None])
        clean = ~counted | kept
        Nk, Kk = (Nw * clean).sum(-1), (Kw * clean).sum(-1)
        Bc = np.maximum(clean.sum(-1), 1)
        p_all = (Kk + 0.5) / (Nk + 1.0)
        M = np.maximum(kept.sum(-1), 1)
        # Mean squared Pearson residual of the kept windows, corrected for the truncation.
        r2k = r2 * kept
        r2m = r2k.sum(-1) / M
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
        S = p.slots_per_day
        if S > 1:
            sl = slot % S
            same = (np.lib.stride_tricks.sliding_window_view(sl, B)[:J] == sl[B:, None]) & clean
            Ns, Ks, Ws = (Nw * same).sum(-1), (Kw * same).sum(-1), same.sum(-1)
            # Shrunk toward the overall share with the weight of an average slot's items, and at least
            # SLOT_PRIOR_DOCS: a quiet scope's hour holds a handful of items, too few to set a share alone.
            m0 = np.maximum(Nk / S, SLOT_PRIOR_DOCS)
            base_p = (Ks + m0 * p_all) / (Ns + m0 + 1e-12)
            w0 = Bc / S
            lam = (Ks + w0 * lam_all) / (Ws + w0)
        else:
            base_p, lam = p_all, lam_all
        # A share that drifted up is the new normal, not a spike: p0 follows the share of the last day and
        # of the last three days (each shrunk toward the long baseline) whenever they run above it. Those
        # count all windows, not only clean ones (a drift makes the newest windows outliers against the long
        # baseline), short of the last few that a multi-window spike may still be part of.
        hi = B - p.sustained_windows
        for span in RECENT_WINDOWS:
            lo = max(0, hi - span)
            Nr, Kr = Nw[..., lo:hi].sum(-1), Kw[..., lo:hi].sum(-1)
            base_p = np.maximum(base_p, (Kr + RECENT_PRIOR_DOCS * base_p) / (Nr + RECENT_PRIOR_DOCS))
        p0[:, B:] = base_p
        rho[:, B:] = np.clip(np.nan_to_num(r), 0.0, RHO_MAX)
        expected[:, B:] = lam
        expected_sd[:, B:] = np.sqrt(np.maximum(var_k, lam))
        Nb[:, B:] = Nk
    p0 = np.clip(p0, 1e-4, 1 - 1e-4)

    ok = has_base & (Nb >= p.min_baseline_docs)
    pv, z, hot = _tail_test(n, k, p0, rho, ok, p)
    if T > B:
        pc = _count_test(n, k, p0, slot, B, p.window_minutes)
        hotc = _passes(n, k, p0, ok & (pv <= COUNT_GATE_P), pc, p)
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
        pvm, zm, hotm = _tail_test(nm, km, p0m, rho, okm, p, charge=SCAN_CHARGE)
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


def _count_test(
    n: np.ndarray, k: np.ndarray, p0: np.ndarray, slot: np.ndarray, B: int, window_minutes: int
) -> np.ndarray:
    """Negative volume against its time-of-day expectation: mid-p upper tail of a negative binomial.

    Expected negatives = baseline share x the mean volume of the same time-of-day slot in the baseline;
    the volume's Gamma-Poisson dispersion is estimated from the baseline around those slot means, and the
    slot mean's own sampling error is added to the variance. A spike of new negative items raises n as
    well as k, which hides part of it from the share test; at a few items per window this test sees it.
    Arrays are (scopes, windows); the slots are shared.
    """
    R, T = n.shape
    J = T - B
    out = np.ones((R, T))
    S = (24 * 60) // window_minutes if (24 * 60) % window_minutes == 0 else 1
    slot = slot % S
    Nw = np.lib.stride_tricks.sliding_window_view(n, B, axis=1)[:, :J]
    Sw = np.lib.stride_tricks.sliding_window_view(slot, B)[:J]
    # Per-slot sums of each target's baseline: one (R, B) @ (B, S) matrix product per target window.
    onehot = (slot[:, None] == np.arange(S)).astype(np.float64)  # (T, S)
    cnt = np.stack([onehot[j : j + B].sum(0) for j in range(J)])  # (J, S)
    smean = np.stack([n[:, j : j + B] @ onehot[j : j + B] for j in range(J)], axis=1) / np.maximum(cnt, 1)
    m_j = np.take_along_axis(smean, np.broadcast_to(Sw, (R, J, B)), axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv_r = np.where(m_j > 0, ((Nw - m_j) ** 2 - m_j) / np.maximum(m_j, 1e-9) ** 2, 0.0)
    c = np.maximum(cnt.min(1), 2)
    inv_r = np.maximum(inv_r.mean(-1) * c / (c - 1), 1e-3)
    pb = p0[:, B:]
    # Volume-conditional: the volume the window's non-negative items imply, when above the usual volume
    # (a news day brings more of every kind of item; a negative surge leaves the others as they were). It
    # is taken a little low (up to 2 SD, at most 4 items) so that a few extra items in a quiet hour still
    # count against the usual volume.
    others = n[:, B:] - k[:, B:]
    implied = np.maximum(others - np.minimum(2 * np.sqrt(others), 4.0), 0.0) / (1 - pb)
    nexp = np.maximum(np.maximum(smean[:, np.arange(J), slot[B:]], 0.1), implied)
    lam = np.maximum(pb * nexp, 0.05)
    var = lam + lam**2 * inv_r + pb**2 * (nexp + nexp**2 * inv_r) / c
    phi = var / lam
    size, prob = lam / np.maximum(phi - 1, 1e-9), 1 / phi
    kk = k[:, B:].astype(np.int64)
    pc = sps.nbinom.sf(kk - 1, size, prob) - 0.5 * sps.nbinom.pmf(kk, size, prob)
    out[:, B:] = np.clip(np.nan_to_num(pc, nan=1.0), 0.0, 1.0)
    return out


def _tail_test(
    n: np.ndarray,
    k: np.ndarray,
    p0: np.ndarray,
    rho: np.ndarray,
    ok: np.ndarray,
    p: DetectorParams,
    charge: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Beta-binomial upper tail P(K >= k | n) as a mid-p value (P(K > k) + P(K = k) / 2, so that a few
    items per window are not tested far below the nominal level), its z-score, and whether each window
    passes every gate."""
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
    pv = np.clip(np.nan_to_num(pv * charge, nan=1.0), 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        sd = np.sqrt(n * p0 * (1 - p0) * (1 + np.maximum(n - 1, 0) * rho))
        z = np.nan_to_num(np.where(sd > 0, (k - n * p0) / sd, 0.0))
    return pv, z, _passes(n, k, p0, ok, pv, p)


def _passes(
    n: np.ndarray, k: np.ndarray, p0: np.ndarray, ok: np.ndarray, pv: np.ndarray, p: DetectorParams
) -> np.ndarray:
    """The gates every test shares: enough items and negatives, a real rise in share, p <= warning_p."""
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(n > 0, k / np.where(n > 0, n, 1), 0.0)
    return ok & (n >= p.min_volume) & (k >= p.min_negative) & (share - p0 >= p.min_share_increase) & (pv <= p.warning_p)


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
                    return Event("spike", t, t, sev)
        elif st.warm[i]:
            quiet = 0
            if st.hot[i] and (
                float(st.p_value[i]) <= last_p * ESCALATE_FACTOR or (st.critical[i] and sev == "warning")
            ):
                last_p = float(st.p_value[i])
                sev = "critical" if st.critical[i] else sev
                if i == t:
                    return Event("escalated", t, onset, sev)
        else:
            quiet += 1
            if quiet >= C:
                open_ = False
                if i == t:
                    return Event("resolved", t, onset, sev)
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


# --- the database path -------------------------------------------------------------------------


def _check_as_of(as_of: datetime, window_minutes: int) -> None:
    if as_of.tzinfo is None:
        raise ValueError(f"as_of={as_of!r} is naive: pass a timezone-aware UTC datetime")
    step = window_minutes * 60
    if int(as_of.timestamp()) % step or as_of.microsecond:
        raise ValueError(
            f"as_of={as_of.isoformat()} is not aligned to the {window_minutes}-minute window grid "
            "(pass a window end, e.g. the Airflow data interval end)"
        )


@dataclass(slots=True)
class ScopeMatrix:
    """Per-window counts of many scopes as (scopes, windows) arrays; row i belongs to keys[i] (sorted)."""

    keys: list[tuple[str, str]]
    n: np.ndarray
    k: np.ndarray
    sum_p: np.ndarray
    sum_tw: np.ndarray
    slot: np.ndarray

    def series(self, i: int) -> Series:
        return Series(n=self.n[i], k=self.k[i], slot=self.slot, sum_p=self.sum_p[i], sum_tw=self.sum_tw[i])


def load_series(
    session: Session, cfg: FinsentConfig, model_version: str, range_start: datetime, T: int, p: DetectorParams
) -> dict[tuple[str, str], Series]:
    """Per-scope window counts over [range_start, range_start + T windows) from stored scores."""
    mat = load_matrix(session, cfg, model_version, range_start, T, p)
    return {key: mat.series(i) for i, key in enumerate(mat.keys)}


def _epoch_seconds(conn: Any, column: Any) -> Any:
    """Whole UTC seconds of a timestamp column, computed by the database (parsing 10^5 datetimes in
    Python costs more than the whole detection); windows start on whole minutes, so seconds suffice."""
    if conn.dialect.name == "sqlite":
        return cast(func.strftime("%s", column), BigInteger)
    return cast(func.floor(func.extract("epoch", column)), BigInteger)


def load_matrix(
    session: Session, cfg: FinsentConfig, model_version: str, range_start: datetime, T: int, p: DetectorParams
) -> ScopeMatrix:
    """All scopes' window counts in one pass of grouped pandas arithmetic (no loop per scope)."""
    step = timedelta(minutes=p.window_minutes)
    end = range_start + T * step
    secs = step.total_seconds()
    D, Sc, E = s.Document, s.Score, s.DocumentEntity
    # Core execution (no ORM row processing): this reads every item of the history, 10^5-10^6 rows.
    conn = session.connection()
    rows = conn.execute(
        select(
            D.id,
            _epoch_seconds(conn, D.published_at),
            D.content_hash,
            D.source_name,
            Sc.label == "negative",
            Sc.p_negative,
            Sc.topic,
        )
        .join(Sc, Sc.document_id == D.id)
        .where(Sc.model_version_id == model_version, D.published_at >= range_start, D.published_at < end)
    ).all()
    kinds = set(cfg.detect.scopes)
    ents = (
        conn.execute(
            select(E.document_id, E.entity)
            .join(D, D.id == E.document_id)
            .where(E.kind == "watchlist", D.published_at >= range_start, D.published_at < end)
        ).all()
        if "entity" in kinds and rows
        else []
    )

    keys: set[tuple[str, str]] = set()
    if "market" in kinds:
        keys.add(("market", MARKET))
    if "entity" in kinds:
        keys.update(("entity", w.key) for w in cfg.watchlist)
    if "source" in kinds:
        keys.update(("source", src.name) for src in cfg.sources)
    slots = window_slots(range_start, T, p.window_minutes)
    frames: list[pd.DataFrame] = []
    if rows:
        names = ["id", "epoch", "content_hash", "source_name", "negative", "p_negative", "topic"]
        df = pd.DataFrame(dict(zip(names, zip(*rows, strict=True), strict=True)))  # column-wise: no per-row checks
        df["content_hash"] = pd.factorize(df["content_hash"])[0]  # integer keys group several times faster
        df["w"] = (df["epoch"].astype(np.int64) - int(range_start.timestamp())) // int(secs)
        df = df[(df["w"] >= 0) & (df["w"] < T)]
        df["neg"] = df["negative"].astype(np.float64)
        df["p"] = df["p_negative"].astype(np.float64)
        weights = {t: topic_weight(t) for t in df["topic"].dropna().unique()}
        df["tw_neg"] = df["topic"].map(weights).fillna(topic_weight(None)).astype(np.float64) * df["neg"]

        def add(kind: str, frame: pd.DataFrame, scope_col: str, dedup_col: str) -> None:
            """Count one item per (scope, window, dedup key); a story is negative if any copy is."""
            if frame.empty:
                return
            items = frame.groupby([scope_col, "w", dedup_col], sort=False)[["neg", "p", "tw_neg"]].max()
            g = items.groupby(level=[0, 1]).agg(
                n=("neg", "size"), k=("neg", "sum"), sp=("p", "sum"), stw=("tw_neg", "sum")
            )
            g = g.reset_index(names=["value", "w"])
            frames.append(g.assign(kind=kind, value=g["value"].astype(str)))

        if "market" in kinds:
            add("market", df.assign(scope=MARKET), "scope", "content_hash")
        if "entity" in kinds and ents:
            ids, names_ = zip(*ents, strict=True)
            ent_df = pd.DataFrame({"id": ids, "entity": names_}).drop_duplicates()
            add("entity", df.merge(ent_df, on="id"), "entity", "content_hash")
        if "source" in kinds:
            add("source", df, "source_name", "id")
        if "topic" in kinds:
            add("topic", df[df["topic"].notna()], "topic", "content_hash")
    counts = pd.concat(frames, ignore_index=True) if frames else None
    if counts is not None:
        keys.update(zip(counts["kind"], counts["value"], strict=True))
    ordered = sorted(keys)
    R = len(ordered)
    mat = ScopeMatrix(ordered, np.zeros((R, T)), np.zeros((R, T)), np.zeros((R, T)), np.zeros((R, T)), slots)
    if counts is not None:
        row = pd.MultiIndex.from_tuples(ordered).get_indexer(
            pd.MultiIndex.from_arrays([counts["kind"], counts["value"]])
        )
        w = counts["w"].to_numpy()
        mat.n[row, w], mat.k[row, w] = counts["n"].to_numpy(), counts["k"].to_numpy()
        mat.sum_p[row, w], mat.sum_tw[row, w] = counts["sp"].to_numpy(), counts["stw"].to_numpy()
    return mat


def window_slots(range_start: datetime, T: int, window_minutes: int) -> np.ndarray:
    """Time-of-day slot (UTC) of each window's start."""
    first = int(range_start.timestamp()) % 86400 // (window_minutes * 60)
    return (first + np.arange(T)) % max(1, 86400 // (window_minutes * 60))


def _top_documents_many(
    session: Session, scopes: Sequence[tuple[str, str]], model_version: str, start: datetime, end: datetime
) -> dict[tuple[str, str], list[tuple[AlertItem, str]]]:
    """The most negative documents of each alerting scope in [start, end), from one query for all scopes
    (not one per scope): highest p_negative first, then newest, one copy per story."""
    if not scopes:
        return {}
    D, Sc, E = s.Document, s.Score, s.DocumentEntity
    q = (
        select(
            D.id,
            D.title,
            D.summary,
            D.link,
            D.source_name,
            D.content_hash,
            D.published_at,
            Sc.p_negative,
            Sc.topic,
            E.entity,
        )
        .join(Sc, Sc.document_id == D.id)
        .outerjoin(E, (E.document_id == D.id) & (E.kind == "watchlist"))
        .where(
            Sc.model_version_id == model_version, Sc.label == "negative", D.published_at >= start, D.published_at < end
        )
    )
    docs: dict[int, Any] = {}
    by_scope: dict[tuple[str, str], set[int]] = {}
    for r in session.execute(q):
        docs.setdefault(r.id, r)
        by_scope.setdefault(("market", MARKET), set()).add(r.id)
        by_scope.setdefault(("source", r.source_name), set()).add(r.id)
        if r.topic is not None:
            by_scope.setdefault(("topic", r.topic), set()).add(r.id)
        if r.entity is not None:
            by_scope.setdefault(("entity", r.entity), set()).add(r.id)
    out: dict[tuple[str, str], list[tuple[AlertItem, str]]] = {}
    for key in scopes:
        ranked = sorted(
            (docs[i] for i in by_scope.get(key, ())), key=lambda r: (-r.p_negative, -r.published_at.timestamp(), r.id)
        )
        seen: set[str] = set()
        items: list[tuple[AlertItem, str]] = []
        for r in ranked:
            if r.content_hash in seen:
                continue
            seen.add(r.content_hash)
            item = AlertItem(
                document_id=r.id, title=r.title, link=r.link, source=r.source_name, p_negative=float(r.p_negative)
            )
            items.append((item, document_text(r.title, r.summary)))
            if len(items) >= TOP_DOCUMENTS:
                break
        out[key] = items
    return out


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


def _tokens(result: Any, top_k: int) -> tuple[str, ...]:
    """Evidence tokens from whatever explain_text returns: strings, (token, weight) pairs or objects."""
    if result is None:
        return ()
    if hasattr(result, "tokens"):
        result = result.tokens
    out: list[str] = []
    for item in result:
        if isinstance(item, str):
            tok = item
        elif isinstance(item, dict):
            tok = item.get("token") or item.get("text") or ""
        elif isinstance(item, tuple | list) and item:
            tok = item[0]
        else:
            tok = getattr(item, "token", None) or getattr(item, "text", None) or ""
        tok = str(tok).strip()
        if tok:
            out.append(tok[:60])
        if len(out) >= top_k:
            break
    return tuple(out)


def evidence_tokens(scorer: Any, text: str, exclude: Sequence[str] = ()) -> tuple[str, ...]:
    """The words that pushed `text` to its label (explain.explain_text), leaving out `exclude` (the watched
    names), as stored and shown; () on any failure."""
    try:
        from pipeline.explain import explain_text

        return _tokens(explain_text(scorer, text, EVIDENCE_TOKENS, exclude=exclude), EVIDENCE_TOKENS)
    except Exception as e:  # noqa: BLE001  # evidence is optional: a failure must not cost the score or the alert
        log.warning("no evidence tokens: explain_text failed (%s)", type(e).__name__)
        return ()


def _with_evidence(
    items: list[tuple[AlertItem, str]],
    stored: dict[int, tuple[str, ...]],
    scorer: Any = None,
    exclude: Sequence[str] = (),
) -> tuple[AlertItem, ...]:
    """Attach the evidence stored when the documents were scored. Detection never loads the model: a
    scorer the caller already holds (the CLI's one-process cycle) fills in documents stored without any."""
    out = []
    for item, text in items:
        ev = stored.get(item.document_id)
        if ev is None and scorer is not None:
            ev = stored[item.document_id] = evidence_tokens(scorer, text, exclude)
        out.append(AlertItem(item.document_id, item.title, item.link, item.source, item.p_negative, ev or ()))
    return tuple(out)


def item_to_dict(i: AlertItem) -> dict[str, Any]:
    return {
        "document_id": i.document_id,
        "title": i.title,
        "link": i.link,
        "source": i.source,
        "p_negative": round(i.p_negative, 4),
        "evidence": list(i.evidence),
    }


def alert_from_row(a: s.Alert) -> AlertRecord:
    """Rebuild the record from a stored alert (notify and the CLI read alerts back this way)."""
    docs = tuple(
        AlertItem(
            document_id=int(d["document_id"]),
            title=str(d.get("title", "")),
            link=d.get("link"),
            source=str(d.get("source", "")),
            p_negative=float(d.get("p_negative", 0.0)),
            evidence=tuple(d.get("evidence") or ()),
        )
        for d in (a.details or {}).get("top_documents", [])
    )
    return AlertRecord(
        id=a.id,
        scope_kind=a.scope_kind,
        scope_value=a.scope_value,
        window_start=a.window_start,
        window_end=a.window_end,
        kind=a.kind,
        severity=a.severity,
        neg_count=a.neg_count,
        total_count=a.total_count,
        neg_share=a.neg_share,
        baseline_share=a.baseline_share,
        baseline_neg_rate=a.baseline_neg_rate,
        statistic=a.statistic,
        p_value=a.p_value,
        risk_score=a.risk_score,
        top_documents=docs,
        episode_id=a.episode_id,
    )


def detect_spikes(
    engine: Engine,
    cfg: FinsentConfig,
    as_of: datetime,
    model_version: str,
    scorer: Any = None,
    *,
    explain: bool = True,
) -> list[AlertRecord]:
    """Alerts (spikes and resolutions) for the window ending at `as_of`; stores them and the risk scores.

    Idempotent: a retry or backfill of the same window stores nothing new and returns the same alerts.
    Evidence tokens are read from the `explanations` stored at scoring time; the model is never loaded
    here. `scorer` (optional, already loaded by the caller) explains documents stored without evidence.
    """
    p = DetectorParams.from_config(cfg.detect)
    _check_as_of(as_of, p.window_minutes)
    step = timedelta(minutes=p.window_minutes)
    T = p.history_windows
    range_start = as_of - T * step
    t = T - 1
    w_start, w_end = as_of - step, as_of

    with session_scope(engine) as session:
        mat = load_matrix(session, cfg, model_version, range_start, T, p)
    now_t, events = scan_matrix(mat, t, p)

    found: list[tuple[str, str, Event, SeriesStats, Series, RiskComponents]] = []
    risk_rows = []
    for i, (kind, value) in enumerate(mat.keys):
        n_t, k_t = int(mat.n[i, t]), int(mat.k[i, t])
        rc = risk_components(
            n=n_t,
            neg=k_t,
            sum_p_negative=float(mat.sum_p[i, t]),
            sum_topic_weight_negative=float(mat.sum_tw[i, t]),
            baseline_share=float(now_t.p0[i]),
            expected_negatives=float(now_t.expected[i]),
            negatives_sd=float(now_t.expected_sd[i]),
        )
        risk_rows.append(
            {
                "scope_kind": kind,
                "scope_value": value,
                "window_start": w_start,
                "window_end": w_end,
                "risk": rc.risk,
                "components": {
                    **rc.as_dict(),
                    "n": n_t,
                    "negatives": k_t,
                    "expected_negatives": round(float(now_t.expected[i]), 4),
                    "baseline_share": round(float(now_t.p0[i]), 4),
                    "p_value": float(now_t.p_value[i]),
                    "model_version": model_version,
                },
                "computed_at": datetime.now(UTC),
            }
        )
        if i in events:
            ev, st = events[i]
            found.append((kind, value, ev, st, mat.series(i), rc))

    records: list[AlertRecord] = []
    with session_scope(engine) as session:
        if risk_rows:
            stmt = _insert(session, s.RiskScore)
            stmt = stmt.on_conflict_do_update(
                index_elements=["scope_kind", "scope_value", "window_start"],
                set_={
                    "window_end": stmt.excluded.window_end,
                    "risk": stmt.excluded.risk,
                    "components": stmt.excluded.components,
                    "computed_at": stmt.excluded.computed_at,
                },
            )
            # executemany, never one multi-row VALUES: psycopg caps a statement at 65,535 parameters.
            session.execute(stmt, risk_rows)
        tops = _top_documents_many(
            session,
            [(kind, value) for kind, value, ev, *_ in found if ev.kind != "resolved"],
            model_version,
            w_start,
            w_end,
        )

    evidence: dict[int, tuple[str, ...]] = {}
    if explain and any(tops.values()):
        with session_scope(engine) as session:
            evidence = load_explanations(
                session, model_version, (i.document_id for docs in tops.values() for i, _ in docs)
            )
    # Every watched name is left out of evidence (whichever scope cites the document).
    names = [x for w in cfg.watchlist for x in (w.name, w.ticker, *w.aliases)]
    for kind, value, ev, st, ser, rc in found:
        onset_start = w_start - (t - ev.onset) * step
        n, k = int(ser.n[t]), int(ser.k[t])
        docs = (
            _with_evidence(tops.get((kind, value), []), evidence, scorer if explain else None, names)
            if ev.kind != "resolved"
            else ()
        )
        records.append(
            AlertRecord(
                id=alert_id(kind, value, w_start, w_end, ev.kind),
                scope_kind=kind,
                scope_value=value,
                window_start=w_start,
                window_end=w_end,
                kind=ev.kind,
                severity=ev.severity if ev.kind != "resolved" else "info",
                neg_count=k,
                total_count=n,
                neg_share=k / n if n else 0.0,
                baseline_share=float(st.p0[t]),
                baseline_neg_rate=float(st.expected[t]),
                statistic=float(st.z[t]),
                p_value=float(st.p_value[t]),
                risk_score=rc.risk,
                top_documents=docs,
                episode_id=episode_id(kind, value, onset_start),
            )
        )
    if records:
        with session_scope(engine) as session:
            now = datetime.now(UTC)
            rows = [
                {
                    "id": r.id,
                    "episode_id": r.episode_id,
                    "kind": r.kind,
                    "scope_kind": r.scope_kind,
                    "scope_value": r.scope_value,
                    "window_start": r.window_start,
                    "window_end": r.window_end,
                    "severity": r.severity,
                    "neg_count": r.neg_count,
                    "total_count": r.total_count,
                    "neg_share": r.neg_share,
                    "baseline_share": r.baseline_share,
                    "baseline_neg_rate": r.baseline_neg_rate,
                    "statistic": r.statistic,
                    "p_value": r.p_value,
                    "risk_score": r.risk_score,
                    "details": _details(r, ev_sev, onset, model_version, p),
                    "created_at": now,
                }
                for r, ev_sev, onset in _with_episode_info(records, found, w_start, t, step)
            ]
            session.execute(_insert(session, s.Alert).on_conflict_do_nothing(index_elements=["id"]), rows)
    for r in records:
        log.info(
            "%s %s %s=%s window %s: %d/%d negative (baseline share %.1f%%), p=%.2g, risk %.0f",
            r.kind, r.severity, r.scope_kind, r.scope_value, r.window_end.isoformat(), r.neg_count,
            r.total_count, 100 * r.baseline_share, r.p_value or 1.0, r.risk_score or 0.0,
        )  # fmt: skip
    return records


def _with_episode_info(
    records: Sequence[AlertRecord], found: Sequence[tuple], w_start: datetime, t: int, step: timedelta
) -> Iterable[tuple[AlertRecord, str, datetime]]:
    for r, (_k, _v, ev, *_rest) in zip(records, found, strict=True):
        yield r, ev.severity, w_start - (t - ev.onset) * step


def _details(
    r: AlertRecord, episode_severity: str, onset: datetime, model_version: str, p: DetectorParams
) -> dict[str, Any]:
    return {
        "model_version": model_version,
        "episode_severity": episode_severity,
        "episode_onset": onset.isoformat(),
        "top_documents": [item_to_dict(i) for i in r.top_documents],
        "detector": {
            "method": "beta-binomial share test + negative-volume test vs trailing baseline (mid-p)",
            "window_minutes": p.window_minutes,
            "baseline_windows": p.baseline_windows,
            "warning_p": p.warning_p,
            "critical_p": p.critical_p,
            "exit_p": p.exit_p,
            "seasonality": p.seasonality,
        },
    }
