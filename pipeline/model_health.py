"""Runtime model monitoring: notice when what the model produces for a source drifts from its usual output.

A model fed tweets where it expects newswire headlines, another language, or a spam burst keeps producing
confident-looking labels; the spike detector then reasons on garbage. After each detection window the
detect step records, per enabled source, what the model produced in that window (`model_health_windows`):
share per label, histogram and mean of the top probability, share below `low_confidence`, language mix,
histogram and mean of text length, and the share of texts probably truncated (longer than `max_length`
tokens, estimated as `max_length x 4` characters: English BERT tokens average about 4.5 characters).

**Statistic.** Each of four histograms (label, confidence, language, length) is compared with the same
source's trailing baseline (its earlier windows of the last `baseline_days` that were not themselves
drifted, pooled, same model version) by the Population Stability Index, PSI = sum (w - b) ln(w / b) over
bins (0.5 added to every count). PSI is an effect size that does not grow with the sample, with the usual
reading 0.1 "moderate", 0.25 "major"; alone it is noisy on small windows (20 items often exceed 0.25 by
chance). So a feature drifts only when PSI >= `psi_threshold` AND a chi-square test of homogeneity of the
window's counts against the baseline's gives p < `alpha`; the test alone would flag trivial shifts in
windows of thousands. KS is not used: every feature is categorical or binned. Windows of one source are
autocorrelated, which makes the test optimistic: hence the small default alpha (1e-3) and the PSI floor.

**Reference.** The trailing baseline decides, because a source's own normal mix legitimately differs from
the evaluation sets (a newswire is mostly neutral). The production model's evaluation run (predicted label
mix on FPB test + TFNS dev, from `docs/model-evaluation.json` when its version is the one scoring) is also
compared and stored as `psi_eval` for the dashboard: it says whether the model runs on data like the data
it was measured on, not whether something changed.

**Alert.** When `sustained_k` of the source's last `sustained_m` judged windows drifted, one `alerts` row
(kind `model_health`, scope kind `model`, scope value the source; id derived from the episode's first
drifted window, so later cycles add nothing) names the source, the feature, its PSI and p-value, and is
delivered by notify's machinery like a source-health alert. When none of the last `sustained_m` judged
windows drifted, a `resolved` alert of the episode follows. Drifted windows never enter the baseline, so a
lasting change stays open until the data returns or someone acknowledges it; a new model version starts a
new baseline.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, case, func, select
from sqlalchemy.orm import Session

from pipeline.config import FinsentConfig, ModelHealthConfig
from pipeline.health import _id
from pipeline.records import AlertKind, OpsScope, Severity
from pipeline.store import _insert, session_scope
from pipeline.store import schema as s

log = logging.getLogger(__name__)

# Model-drift alerts: scope OpsScope.MODEL, kind AlertKind.MODEL_HEALTH, their end AlertKind.RESOLVED.

LABELS = ("negative", "neutral", "positive")
CONF_EDGES = (0.5, 0.6, 0.7, 0.8, 0.9)  # top-probability histogram bins
LENGTH_EDGES = (40, 80, 160, 320, 640)  # text-length histogram bins (characters)
CHARS_PER_TOKEN_ESTIMATE = 4  # truncated: longer than max_length tokens, estimated in characters
FEATURES = ("label", "confidence", "language", "length")
EVALUATION_FILE = Path(__file__).resolve().parent.parent / "docs" / "model-evaluation.json"
EVALUATION_SPLITS = ("fpb_test", "tfns_dev")


def _bin(value: float, edges: tuple[float, ...]) -> str:
    """Bin name of value: '<e0', 'e0-e1', ..., '>=eN'."""
    if value < edges[0]:
        return f"<{edges[0]:g}"
    for lo, hi in itertools.pairwise(edges):
        if value < hi:
            return f"{lo:g}-{hi:g}"
    return f">={edges[-1]:g}"


@dataclass(slots=True)
class WindowStats:
    """What the model produced for one source in one window."""

    documents: int = 0
    scored: int = 0
    histograms: dict[str, dict[str, int]] = field(default_factory=lambda: {f: {} for f in FEATURES})
    top_prob_sum: float = 0.0
    low_conf: int = 0
    chars_sum: int = 0
    truncated: int = 0

    def add(self, feature: str, key: str, n: int = 1) -> None:
        h = self.histograms[feature]
        h[key] = h.get(key, 0) + n

    def summary(self) -> dict[str, Any]:
        sc, dc = self.scored, self.documents
        labels = self.histograms["label"]
        return {
            "documents": dc,
            "scored": sc,
            "histograms": self.histograms,
            "label_shares": {k: round(labels.get(k, 0) / sc, 4) for k in LABELS} if sc else {},
            "mean_top_prob": round(self.top_prob_sum / sc, 4) if sc else None,
            "low_conf_share": round(self.low_conf / sc, 4) if sc else None,
            "mean_text_chars": round(self.chars_sum / dc, 1) if dc else None,
            "truncated_share": round(self.truncated / dc, 4) if dc else None,
        }


@dataclass(frozen=True, slots=True)
class Comparison:
    feature: str
    psi: float
    p_value: float
    drifted: bool


@dataclass(slots=True)
class ModelHealthReport:
    windows: int = 0  # source windows recorded
    drifted: list[str] = field(default_factory=list)  # sources whose window drifted
    opened: list[str] = field(default_factory=list)  # alert ids stored
    resolved: list[str] = field(default_factory=list)


def window_stats(
    session: Session, source: str, version: str, start: datetime, end: datetime, mh: ModelHealthConfig, max_length: int
) -> WindowStats:
    """Distributions of one source's documents published in [start, end) and this model's scores of them."""
    D, Sc = s.Document, s.Score
    chars = func.length(D.title) + case(
        ((D.summary != "") & (D.summary != D.title), func.length(D.summary) + 2), else_=0
    )
    rows = session.execute(
        select(D.language, chars.label("chars"), Sc.label, Sc.p_negative, Sc.p_neutral, Sc.p_positive)
        .outerjoin(Sc, (Sc.document_id == D.id) & (Sc.model_version_id == version))
        .where(D.source_name == source, D.published_at >= start, D.published_at < end)
    ).all()
    st = WindowStats()
    trunc_chars = max_length * CHARS_PER_TOKEN_ESTIMATE
    for r in rows:
        st.documents += 1
        n = int(r.chars or 0)
        st.chars_sum += n
        st.truncated += n > trunc_chars
        st.add("language", (r.language or "und").lower())
        st.add("length", _bin(n, LENGTH_EDGES))
        if r.label is None:
            continue
        top = max(r.p_negative or 0.0, r.p_neutral or 0.0, r.p_positive or 0.0)
        st.scored += 1
        st.top_prob_sum += top
        st.low_conf += top < mh.low_confidence
        st.add("label", r.label)
        st.add("confidence", _bin(top, CONF_EDGES))
    return st


def psi(window: dict[str, int], baseline: dict[str, int]) -> float:
    """Population Stability Index of two count histograms over the union of their bins (0.5 added per bin)."""
    keys = sorted(set(window) | set(baseline))
    nw, nb = sum(window.values()) + 0.5 * len(keys), sum(baseline.values()) + 0.5 * len(keys)
    total = 0.0
    for k in keys:
        w, b = (window.get(k, 0) + 0.5) / nw, (baseline.get(k, 0) + 0.5) / nb
        total += (w - b) * math.log(w / b)
    return total


def homogeneity_p(window: dict[str, int], baseline: dict[str, int]) -> float:
    """p-value of a chi-square test that window and baseline counts come from one distribution."""
    from scipy import stats

    keys = [k for k in sorted(set(window) | set(baseline)) if window.get(k, 0) + baseline.get(k, 0) > 0]
    if len(keys) < 2 or not sum(window.values()) or not sum(baseline.values()):
        return 1.0
    table = [[window.get(k, 0) for k in keys], [baseline.get(k, 0) for k in keys]]
    return float(stats.chi2_contingency(table, correction=False).pvalue)


def compare(feature: str, window: dict[str, int], baseline: dict[str, int], mh: ModelHealthConfig) -> Comparison:
    value, p = psi(window, baseline), homogeneity_p(window, baseline)
    return Comparison(feature, round(value, 4), p, value >= mh.psi_threshold and p < mh.alpha)


def _baseline(
    session: Session, source: str, version: str, start: datetime, mh: ModelHealthConfig
) -> tuple[dict[str, dict[str, int]], int, int]:
    """Pooled histograms of the source's earlier windows that did not drift; (histograms, scored, documents)."""
    W = s.ModelHealthWindow
    rows = session.execute(
        select(W.histograms, W.scored, W.documents).where(
            W.source_name == source,
            W.model_version_id == version,
            W.window_start < start,
            W.window_start >= start - timedelta(days=mh.baseline_days),
            W.drifted.is_not(True),
        )
    ).all()
    pooled: dict[str, dict[str, int]] = {f: {} for f in FEATURES}
    for r in rows:
        for f in FEATURES:
            for k, n in (r.histograms or {}).get(f, {}).items():
                pooled[f][k] = pooled[f].get(k, 0) + int(n)
    return pooled, sum(r.scored for r in rows), sum(r.documents for r in rows)


def evaluation_label_counts(version: str, path: Path = EVALUATION_FILE) -> dict[str, int] | None:
    """Predicted label counts of the evaluation run (confusion columns of FPB test + TFNS dev), when the
    evaluation file is there and describes this model version."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if data.get("version") != version:
        return None
    counts: dict[str, int] = {}
    for split in EVALUATION_SPLITS:
        r = data.get("results", {}).get("model", {}).get(split) or {}
        for j, lab in enumerate(r.get("labels") or []):
            counts[lab] = counts.get(lab, 0) + sum(int(row[j]) for row in r.get("confusion") or [])
    return counts or None


def judge(
    st: WindowStats, base: dict[str, dict[str, int]], base_scored: int, base_docs: int, mh: ModelHealthConfig
) -> list[Comparison]:
    """Comparisons of the features that have enough items in the window and the baseline."""
    out = []
    for f in FEATURES:
        scored_feature = f in ("label", "confidence")
        n_w, n_b = (st.scored, base_scored) if scored_feature else (st.documents, base_docs)
        if n_w >= mh.min_items and n_b >= mh.baseline_min_items:
            out.append(compare(f, st.histograms[f], base[f], mh))
    return out


def record_window(
    session: Session, cfg: FinsentConfig, source: str, version: str, start: datetime, end: datetime, now: datetime
) -> s.ModelHealthWindow | None:
    """Compute and store (or refresh) one source window; None when the source had nothing in it."""
    mh = cfg.model_health
    st = window_stats(session, source, version, start, end, mh, cfg.model.max_length)
    if not st.documents:
        return None
    base, base_scored, base_docs = _baseline(session, source, version, start, mh)
    comparisons = judge(st, base, base_scored, base_docs, mh)
    drifted = any(c.drifted for c in comparisons) if comparisons else None
    worst = max(comparisons, key=lambda c: (c.drifted, c.psi), default=None)
    ev = evaluation_label_counts(version)
    row = {
        "source_name": source,
        "model_version_id": version,
        "window_start": start,
        "window_end": end,
        **st.summary(),
        "baseline_items": base_docs,
        "feature": worst.feature if worst else None,
        "psi": worst.psi if worst else None,
        "p_value": worst.p_value if worst else None,
        "psi_eval": round(psi(st.histograms["label"], ev), 4) if ev and st.scored >= mh.min_items else None,
        "drifted": drifted,
        "computed_at": now,
    }
    W = s.ModelHealthWindow
    stmt = _insert(session, W).values(row)
    keys = ["source_name", "model_version_id", "window_start"]
    session.execute(
        stmt.on_conflict_do_update(index_elements=keys, set_={k: v for k, v in row.items() if k not in keys})
    )
    if drifted:
        assert worst is not None
        log.warning(
            "model drift on source %s in window %s: %s PSI %.2f (p=%.2g)",
            source,
            start.isoformat(),
            worst.feature,
            worst.psi,
            worst.p_value,
        )
    return session.get(W, (source, version, start))


def _alert_row(
    source: str,
    version: str,
    episode_start: datetime,
    w: s.ModelHealthWindow,
    drifted: int,
    mh: ModelHealthConfig,
    now: datetime,
) -> dict[str, Any]:
    aid = _id(AlertKind.MODEL_HEALTH, source, version, episode_start.isoformat())
    return {
        "id": aid,
        "episode_id": aid,
        "kind": AlertKind.MODEL_HEALTH,
        "scope_kind": OpsScope.MODEL,
        "scope_value": source,
        "window_start": episode_start,
        "window_end": w.window_end,
        "severity": Severity.WARNING,
        "neg_count": drifted,
        "total_count": w.scored,
        "neg_share": 0.0,
        "baseline_share": 0.0,
        "baseline_neg_rate": 0.0,
        "statistic": w.psi or 0.0,
        "p_value": w.p_value,
        "details": {
            "feature": w.feature,
            "psi": w.psi,
            "p_value": w.p_value,
            "model_version": version,
            "drifted_windows": drifted,
            "of_windows": mh.sustained_m,
            "label_shares": w.label_shares,
            "mean_top_prob": w.mean_top_prob,
            "low_conf_share": w.low_conf_share,
            "languages": (w.histograms or {}).get("language", {}),
            "mean_text_chars": w.mean_text_chars,
            "truncated_share": w.truncated_share,
            "episode_severity": Severity.WARNING,
        },
        "created_at": now,
    }


def _episodes(
    session: Session,
    cfg: FinsentConfig,
    source: str,
    version: str,
    upto: datetime,
    now: datetime,
    report: ModelHealthReport,
) -> None:
    """Open a drift episode when k of the last m judged windows drifted; resolve it when none did."""
    mh, W, A = cfg.model_health, s.ModelHealthWindow, s.Alert
    recent = list(
        session.scalars(
            select(W)
            .where(
                W.source_name == source, W.model_version_id == version, W.window_start <= upto, W.drifted.is_not(None)
            )
            .order_by(W.window_start.desc())
            .limit(mh.sustained_m)
        )
    )
    resolved_eps = select(A.episode_id).where(A.scope_kind == OpsScope.MODEL, A.kind == AlertKind.RESOLVED)
    open_alert = session.scalars(
        select(A).where(
            A.scope_kind == OpsScope.MODEL,
            A.kind == AlertKind.MODEL_HEALTH,
            A.scope_value == source,
            A.id.not_in(resolved_eps),
        )
    ).first()
    drifted = [w for w in recent if w.drifted]
    if open_alert is None and len(drifted) >= mh.sustained_k:
        row = _alert_row(source, version, drifted[-1].window_start, drifted[0], len(drifted), mh, now)
        stored = session.execute(
            _insert(session, A).values(row).on_conflict_do_nothing(index_elements=["id"]).returning(A.id)
        )
        if stored.scalar() is not None:
            report.opened.append(row["id"])
            log.error(
                "model drift on source %s: %s PSI %s (p=%s) in %d of the last %d windows",
                source,
                row["details"]["feature"],
                row["statistic"],
                row["p_value"],
                len(drifted),
                len(recent),
            )
    elif (
        open_alert is not None
        and len(recent) >= mh.sustained_m
        and not drifted
        and recent[-1].window_start > open_alert.window_start
    ):
        rid = _id(AlertKind.RESOLVED, open_alert.id)
        row = {
            **{
                k: getattr(open_alert, k)
                for k in ("scope_kind", "scope_value", "window_start", "neg_count", "total_count", "neg_share")
            },
            "id": rid,
            "episode_id": open_alert.id,
            "kind": AlertKind.RESOLVED,
            "window_end": recent[0].window_end,
            "severity": Severity.INFO,
            "baseline_share": 0.0,
            "baseline_neg_rate": 0.0,
            "statistic": recent[0].psi or 0.0,
            "p_value": recent[0].p_value,
            "details": {**(open_alert.details or {}), "resolved_at": now.isoformat(), "psi_now": recent[0].psi},
            "created_at": now,
        }
        session.execute(_insert(session, A).values(row).on_conflict_do_nothing(index_elements=["id"]))
        report.resolved.append(rid)
        log.info("model output on source %s is back to its baseline", source)


def check_models(
    engine: Engine, cfg: FinsentConfig, as_of: datetime, version: str, now: datetime | None = None
) -> ModelHealthReport:
    """Record the window ending at `as_of` for every enabled source, then open or resolve drift episodes."""
    report = ModelHealthReport()
    if not cfg.model_health.enabled:
        return report
    start = as_of - timedelta(minutes=cfg.detect.window_minutes)
    now = now or as_of
    with session_scope(engine) as session:
        if session.get(s.ModelVersion, version) is None:
            return report  # nothing was ever scored with it
        known = set(session.scalars(select(s.Source.name)))
        for src in cfg.sources:
            if not src.enabled or src.name not in known:
                continue
            w = record_window(session, cfg, src.name, version, start, as_of, now)
            if w is None:
                continue
            report.windows += 1
            if w.drifted:
                report.drifted.append(src.name)
            _episodes(session, cfg, src.name, version, start, now, report)
    return report


def is_model_health(alert: s.Alert) -> bool:
    return alert.scope_kind == OpsScope.MODEL


def render_model_health(alert: s.Alert) -> tuple[str, str]:
    """Subject and plain body of a model-drift alert or its resolution (sent as a sink notice)."""
    d = alert.details or {}
    name = alert.scope_value
    since = f"{alert.window_start:%Y-%m-%d %H:%M} UTC"
    p = alert.p_value
    stat = f"{d.get('feature')} PSI {d.get('psi')}" + (f" (chi-square p={p:.2g})" if p is not None else "")
    if alert.kind == AlertKind.RESOLVED:
        subject = f"[RESOLVED] finsent model output on source {name} is back to its baseline"
        lines = [
            f"The model's output on source {name} matches its baseline again; it had drifted since {since} ({stat})."
        ]
    else:
        subject = f"[WARNING] finsent model output drifted on source {name}: {stat}"
        shares = ", ".join(f"{k} {v:.0%}" for k, v in (d.get("label_shares") or {}).items())
        langs = ", ".join(f"{k} {v}" for k, v in sorted((d.get("languages") or {}).items(), key=lambda kv: -kv[1])[:4])
        lines = [
            f"What model {d.get('model_version')} produces for source {name} differs from its trailing baseline in",
            f"{d.get('drifted_windows')} of the last {d.get('of_windows')} windows (since {since}): {stat}.",
            (
                f"Last window: labels {shares or 'n/a'}; mean top probability {d.get('mean_top_prob')}, "
                f"low-confidence share {d.get('low_conf_share')}; languages {langs or 'n/a'}; "
                f"mean length {d.get('mean_text_chars')} chars, truncated share {d.get('truncated_share')}."
            ),
            "Has the feed changed (other content, language, spam)? Alerts from this source may be unreliable.",
        ]
    lines.append(f"Alert id: {alert.id}   (acknowledge: finsent alerts ack {alert.id})")
    return subject, "\n".join(lines)
