"""Model registry and the promotion gate.

Every trained model gets a `model_versions` row. Only a model that is no worse on every fixed
evaluation split and better on the primary one (FPB 50Agree test macro-F1) becomes production, which
is what `finsent run` scores with unless the user names a model explicitly. Evaluation numbers live in
the row's `metrics` JSON (`metrics["eval"]`), with the split fingerprints they were measured on.

With no production row, `finsent run` scores with the bundled default, so that is what a candidate must
beat: its numbers are recorded in its own `finsent.json` (`metrics.eval`, written by
`finsent evaluate MODEL --record-in-model`). Without any baseline numbers the gate refuses; only an
operator's `--force` promotes then.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from pipeline.data import EVAL_SPLITS
from pipeline.errors import FinsentError
from pipeline.model_folder import META_FILE, ModelLoadError, read_meta_dict
from pipeline.store import production_model, register_model, session_scope
from pipeline.store import schema as s

log = logging.getLogger(__name__)

PRIMARY = ("fpb_test", "macro_f1")
GATE_METRICS = ("accuracy", "macro_f1")


class RegistryError(FinsentError, RuntimeError):
    """A registry operation cannot be done; the message says which version and why."""


def register_trained(engine: Engine, path: str | Path, name: str | None = None) -> str:
    """Record a finsent model folder (idempotent); returns its version id."""
    meta = read_meta_dict(path)
    version = str(meta["version"])
    with session_scope(engine) as session:
        register_model(
            session,
            version,
            name=name or meta.get("hyperparameters", {}).get("name") or version,
            path=str(Path(path).expanduser().resolve()),
            base=meta.get("base_name") or meta.get("base"),
            labels=meta.get("labels") or ["negative", "neutral", "positive"],
            topics=meta.get("topics"),
            temperature=meta.get("temperature"),
            data_fingerprints=meta.get("data_fingerprints") or {},
            split_seed=meta.get("split_seed"),
            hyperparameters=meta.get("hyperparameters") or {},
            metrics=meta.get("metrics") or {},
            is_production=False,
        )
    return version


def record_evaluation(
    engine: Engine,
    version: str,
    path: str,
    eval_metrics: Mapping[str, Mapping[str, float | None]],  # ECE is None where a split has no logits
    fingerprints: dict[str, str],
) -> None:
    """Store a model's fixed-split metrics (registering a non-finsent checkpoint on the way if needed)."""
    with session_scope(engine) as session:
        row = session.get(s.ModelVersion, version)
        if row is None:
            register_model(session, version, name=version, path=path, metrics={})
            session.flush()
            row = session.get(s.ModelVersion, version)
            assert row is not None  # registered just above
        metrics = dict(row.metrics or {})
        metrics.update(
            eval=eval_metrics,
            eval_fingerprints=fingerprints,
            evaluated_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        row.metrics = metrics


@dataclass(frozen=True)
class ModelInfo:
    id: str
    name: str | None
    path: str | None
    base: str | None
    is_production: bool
    promoted_at: datetime | None
    created_at: datetime | None
    primary: float | None


def list_models(engine: Engine) -> list[ModelInfo]:
    with session_scope(engine) as session:
        rows = session.scalars(select(s.ModelVersion).order_by(s.ModelVersion.created_at, s.ModelVersion.id)).all()
        return [
            ModelInfo(
                r.id,
                r.name,
                r.path,
                r.base,
                bool(r.is_production),
                r.promoted_at,
                r.created_at,
                _metric(r.metrics, *PRIMARY),
            )
            for r in rows
        ]


def _metric(metrics: dict | None, split: str, name: str) -> float | None:
    v = ((metrics or {}).get("eval") or {}).get(split, {}).get(name)
    return float(v) if v is not None else None


@dataclass(frozen=True)
class Comparison:
    split: str
    metric: str
    candidate: float | None
    incumbent: float | None
    ok: bool


@dataclass
class PromotionDecision:
    promoted: bool
    candidate: str
    incumbent: str | None  # the production row, None when there is none
    reasons: list[str] = field(default_factory=list)
    comparisons: list[Comparison] = field(default_factory=list)
    baseline: str | None = None  # whose numbers the candidate was compared with
    forced: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _set_production(session: Session, version: str) -> None:
    session.execute(update(s.ModelVersion).where(s.ModelVersion.is_production.is_(True)).values(is_production=False))
    session.flush()
    session.execute(
        update(s.ModelVersion)
        .where(s.ModelVersion.id == version)
        .values(is_production=True, promoted_at=datetime.now(UTC))
    )


def bundled_baseline(path: str | Path | None = None) -> tuple[str | None, dict[str, Any] | None, str | None]:
    """(version, metrics, why-not) of the bundled default model, the incumbent when no row is production."""
    from pipeline.config import DEFAULT_MODEL_DIR

    folder = Path(path or DEFAULT_MODEL_DIR)
    try:
        meta = read_meta_dict(folder)
    except ModelLoadError as e:
        return None, None, f"the bundled default model cannot be read ({e})"
    version = str(meta.get("version"))
    metrics = meta.get("metrics") or {}
    if not metrics.get("eval"):
        return (
            version,
            None,
            (
                f"the bundled default {version} has no recorded evaluation metrics (metrics.eval in "
                f"{folder / META_FILE}; "
                f"finsent evaluate {folder} --no-db --record-in-model writes them)"
            ),
        )
    return version, metrics, None


def _incumbent_metrics(
    inc: s.ModelVersion | None, bundled: str | Path | None
) -> tuple[str | None, dict[str, Any] | None, str]:
    """The numbers to beat: production's, else the bundled default's; with a reason when there are none."""
    if inc is not None:
        if (inc.metrics or {}).get("eval"):
            return inc.id, inc.metrics, f"compared with production {inc.id}"
        version, metrics, _ = bundled_baseline(bundled)
        if version == inc.id and metrics is not None:  # the bundled default promoted by hand, never evaluated in the DB
            return inc.id, metrics, f"compared with production {inc.id} (its metrics from the bundled folder)"
        return (
            inc.id,
            None,
            f"production {inc.id} has no evaluation metrics: evaluate it, or promote by hand with --force",
        )
    version, metrics, why = bundled_baseline(bundled)
    if metrics is None:
        return version, None, f"no production model and {why}: nothing to compare with, promote by hand with --force"
    return version, metrics, f"no production model: compared with the bundled default {version}"


def promote_if_better(
    engine: Engine,
    candidate_version: str,
    *,
    tolerance: float = 0.0,
    force: bool = False,
    bundled: str | Path | None = None,
) -> PromotionDecision:
    """Promote only if no worse (within `tolerance`) on every fixed split and strictly better on the primary one
    than production, or than the bundled default (`bundled`, default models/finsent-minilm) when nothing is
    production. `force` promotes a refused candidate anyway, keeping the comparison on record."""
    with session_scope(engine) as session:
        cand = session.get(s.ModelVersion, candidate_version)
        if cand is None:
            raise RegistryError(f"no model version {candidate_version!r} in the registry (finsent models list)")
        inc = production_model(session)
        decision = PromotionDecision(False, candidate_version, inc.id if inc else None)
        cand_eval = (cand.metrics or {}).get("eval")
        stored = (cand.metrics or {}).get("promotion_decision") or {}
        if inc is not None and inc.id == candidate_version and stored.get("promoted"):
            # a retried promote task: report the decision that promoted it, don't overwrite it
            log.info("promotion of %s was already decided at %s; unchanged", candidate_version, stored.get("at"))
            return PromotionDecision(
                promoted=True,
                candidate=candidate_version,
                incumbent=stored.get("incumbent"),
                reasons=list(stored.get("reasons", [])),
                comparisons=[Comparison(**c) for c in stored.get("comparisons", [])],
                baseline=stored.get("baseline"),
                forced=bool(stored.get("forced")),
            )
        if inc is not None and inc.id == candidate_version:
            decision.reasons.append(f"{candidate_version} is already production")
        elif not cand_eval:
            decision.reasons.append(
                f"{candidate_version} has no evaluation metrics: run `finsent evaluate` on it first"
            )
        else:
            decision.baseline, base, against = _incumbent_metrics(inc, bundled)
            if base is None:
                decision.reasons.append(against)
            elif (cand.metrics or {}).get("eval_fingerprints") != base.get("eval_fingerprints"):
                decision.reasons.append(
                    f"{against}: evaluated on different splits; re-evaluate both with the same data"
                )
            else:
                decision.reasons.append(against)
                _compare(decision, cand.metrics, base, tolerance)
        if force and not decision.promoted and not (inc is not None and inc.id == candidate_version):
            decision.promoted = decision.forced = True
            decision.reasons.append("forced by the operator although the gate refused")
        if decision.promoted:
            _set_production(session, candidate_version)
        cand.metrics = {
            **(cand.metrics or {}),
            "promotion_decision": {**decision.as_dict(), "at": datetime.now(UTC).isoformat(timespec="seconds")},
        }
    log.info(
        "promotion %s for %s (production was %s, compared with %s): %s; %s",
        ("FORCED" if decision.forced else "ACCEPTED") if decision.promoted else "REFUSED",
        candidate_version,
        decision.incumbent,
        decision.baseline,
        "; ".join(decision.reasons),
        ", ".join(f"{c.split}.{c.metric}={c.candidate} vs {c.incumbent}" for c in decision.comparisons),
    )
    return decision


def _compare(decision: PromotionDecision, cand: dict[str, Any], base: dict[str, Any], tolerance: float) -> None:
    ok = True
    for split in EVAL_SPLITS:
        for metric in GATE_METRICS:
            c, i = _metric(cand, split, metric), _metric(base, split, metric)
            if i is None:
                continue
            fine = c is not None and c >= i - tolerance
            decision.comparisons.append(Comparison(split, metric, c, i, fine))
            if not fine:
                ok = False
                decision.reasons.append(
                    f"worse on {split} {metric}: {c} < {i}" + (f" - {tolerance}" if tolerance else "")
                )
    c, i = _metric(cand, *PRIMARY), _metric(base, *PRIMARY)
    better = c is not None and i is not None and c > i
    decision.comparisons.append(Comparison(PRIMARY[0], f"{PRIMARY[1]} (primary, must improve)", c, i, better))
    if not better:
        ok = False
        decision.reasons.append(f"not better on the primary {PRIMARY[0]} {PRIMARY[1]}: {c} <= {i}")
    if ok:
        decision.promoted = True
        decision.reasons.append(f"better on {PRIMARY[0]} {PRIMARY[1]} ({i} -> {c}) and no worse elsewhere")


def promote(engine: Engine, version: str) -> None:
    """Manual promotion (bypasses the gate: an operator's decision)."""
    with session_scope(engine) as session:
        if session.get(s.ModelVersion, version) is None:
            raise RegistryError(f"no model version {version!r} in the registry (finsent models list)")
        _set_production(session, version)
    log.info("promoted %s by hand", version)


def rollback(engine: Engine) -> str:
    """Return production to the previously promoted version; returns it."""
    with session_scope(engine) as session:
        cur = production_model(session)
        if cur is None:
            raise RegistryError("no production model to roll back")
        q = select(s.ModelVersion).where(s.ModelVersion.id != cur.id, s.ModelVersion.promoted_at.is_not(None))
        if cur.promoted_at is not None:
            q = q.where(s.ModelVersion.promoted_at <= cur.promoted_at)
        prev = session.scalars(q.order_by(s.ModelVersion.promoted_at.desc())).first()
        if prev is None:
            raise RegistryError(f"{cur.id} is the only model ever promoted: nothing to roll back to")
        cur.is_production = False
        cur.metrics = {**(cur.metrics or {}), "rolled_back_at": datetime.now(UTC).isoformat(timespec="seconds")}
        cur.promoted_at = None  # so a second rollback goes further back instead of returning here
        session.flush()
        prev.is_production = True
        version = prev.id
    log.info("rolled back production from %s to %s", cur.id, version)
    return version


def resolve_model_path(cfg: Any, session: Session) -> str:
    """The model `finsent run` uses: an explicit FINSENT_MODEL / model.path, else production, else the bundled
    default."""
    from pipeline.config import DEFAULT_MODEL_DIR, model_override

    explicit = model_override() or (cfg.model.path if cfg.model.path != str(DEFAULT_MODEL_DIR) else None)
    if explicit:
        return explicit
    prod = production_model(session)
    if prod is not None and prod.path:
        if Path(prod.path).expanduser().is_dir() or not prod.path.startswith(("/", ".", "~")):
            return prod.path
        log.warning(
            "production model %s points to missing folder %s; using the bundled default %s",
            prod.id,
            prod.path,
            DEFAULT_MODEL_DIR,
        )
    return str(DEFAULT_MODEL_DIR)
