"""Model registry and the promotion gate.

Every trained model gets a `model_versions` row. Only a model that is no worse on every fixed
evaluation split and better on the primary one (FPB 50Agree test macro-F1) becomes production, which
is what `finsent run` scores with unless the user names a model explicitly. Evaluation numbers live in
the row's `metrics` JSON (`metrics["eval"]`), with the split fingerprints they were measured on.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from pipeline.data import EVAL_SPLITS
from pipeline.score import META_FILE, ModelLoadError
from pipeline.store import production_model, register_model, session_scope
from pipeline.store import schema as s

log = logging.getLogger(__name__)

PRIMARY = ("fpb_test", "macro_f1")
GATE_METRICS = ("accuracy", "macro_f1")


class RegistryError(RuntimeError):
    """A registry operation cannot be done; the message says which version and why."""


def read_meta(path: str | Path) -> dict[str, Any]:
    p = Path(path).expanduser()
    meta_path = p / META_FILE
    if not p.is_dir():
        raise ModelLoadError(f"model folder not found: {p}")
    if not meta_path.is_file():
        raise ModelLoadError(f"model folder {p} has no {META_FILE}: not trained by finsent train")
    try:
        return json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"model folder {p}: {META_FILE} is not valid JSON ({e})") from None


def register_trained(engine: Engine, path: str | Path, name: str | None = None) -> str:
    """Record a finsent model folder (idempotent); returns its version id."""
    meta = read_meta(path)
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


def record_evaluation(engine: Engine, version: str, path: str, eval_metrics: dict[str, dict[str, float]], fingerprints: dict[str, str]) -> None:
    """Store a model's fixed-split metrics (registering a non-finsent checkpoint on the way if needed)."""
    with session_scope(engine) as session:
        row = session.get(s.ModelVersion, version)
        if row is None:
            register_model(session, version, name=version, path=path, metrics={})
            session.flush()
            row = session.get(s.ModelVersion, version)
        metrics = dict(row.metrics or {})
        metrics.update(eval=eval_metrics, eval_fingerprints=fingerprints, evaluated_at=datetime.now(UTC).isoformat(timespec="seconds"))
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
            ModelInfo(r.id, r.name, r.path, r.base, bool(r.is_production), r.promoted_at, r.created_at, _metric(r.metrics, *PRIMARY))
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
    incumbent: str | None
    reasons: list[str] = field(default_factory=list)
    comparisons: list[Comparison] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _set_production(session: Session, version: str) -> None:
    session.execute(update(s.ModelVersion).where(s.ModelVersion.is_production.is_(True)).values(is_production=False))
    session.flush()
    session.execute(
        update(s.ModelVersion).where(s.ModelVersion.id == version).values(is_production=True, promoted_at=datetime.now(UTC))
    )


def promote_if_better(engine: Engine, candidate_version: str, *, tolerance: float = 0.0) -> PromotionDecision:
    """Promote only if no worse (within `tolerance`) on every fixed split and strictly better on the primary one."""
    with session_scope(engine) as session:
        cand = session.get(s.ModelVersion, candidate_version)
        if cand is None:
            raise RegistryError(f"no model version {candidate_version!r} in the registry (finsent models list)")
        inc = production_model(session)
        decision = PromotionDecision(False, candidate_version, inc.id if inc else None)
        cand_eval = (cand.metrics or {}).get("eval")
        if not cand_eval:
            decision.reasons.append(f"{candidate_version} has no evaluation metrics: run `finsent evaluate` on it first")
        elif inc is not None and inc.id == candidate_version:
            decision.reasons.append(f"{candidate_version} is already production")
        elif inc is None:
            decision.promoted = True
            decision.reasons.append("no production model yet")
        else:
            inc_eval = (inc.metrics or {}).get("eval")
            if not inc_eval:
                decision.reasons.append(f"production {inc.id} has no evaluation metrics: evaluate it, or promote by hand")
            elif (cand.metrics or {}).get("eval_fingerprints") != (inc.metrics or {}).get("eval_fingerprints"):
                decision.reasons.append("candidate and production were evaluated on different splits: re-evaluate both with the same data")
            else:
                ok = True
                for split in EVAL_SPLITS:
                    for metric in GATE_METRICS:
                        c, i = _metric(cand.metrics, split, metric), _metric(inc.metrics, split, metric)
                        if i is None:
                            continue
                        fine = c is not None and c >= i - tolerance
                        decision.comparisons.append(Comparison(split, metric, c, i, fine))
                        if not fine:
                            ok = False
                            decision.reasons.append(f"worse on {split} {metric}: {c} < {i}" + (f" - {tolerance}" if tolerance else ""))
                c, i = _metric(cand.metrics, *PRIMARY), _metric(inc.metrics, *PRIMARY)
                better = c is not None and i is not None and c > i
                decision.comparisons.append(Comparison(PRIMARY[0], f"{PRIMARY[1]} (primary, must improve)", c, i, better))
                if not better:
                    ok = False
                    decision.reasons.append(f"not better on the primary {PRIMARY[0]} {PRIMARY[1]}: {c} <= {i}")
                if ok:
                    decision.promoted = True
                    decision.reasons.append(f"better on {PRIMARY[0]} {PRIMARY[1]} ({i} -> {c}) and no worse elsewhere")
        if decision.promoted:
            _set_production(session, candidate_version)
        if cand is not None:
            cand.metrics = {**(cand.metrics or {}), "promotion_decision": {**decision.as_dict(), "at": datetime.now(UTC).isoformat(timespec="seconds")}}
    log.info(
        "promotion %s for %s (production was %s): %s; %s",
        "ACCEPTED" if decision.promoted else "REFUSED",
        candidate_version,
        decision.incumbent,
        "; ".join(decision.reasons),
        ", ".join(f"{c.split}.{c.metric}={c.candidate} vs {c.incumbent}" for c in decision.comparisons),
    )
    return decision


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
    """The model `finsent run` uses: an explicit FINSENT_MODEL / model.path, else production, else the bundled default."""
    from pipeline.config import DEFAULT_MODEL_DIR

    explicit = os.environ.get("FINSENT_MODEL") or (cfg.model.path if cfg.model.path != str(DEFAULT_MODEL_DIR) else None)
    if explicit:
        return explicit
    prod = production_model(session)
    if prod is not None and prod.path:
        if Path(prod.path).expanduser().is_dir() or not prod.path.startswith(("/", ".", "~")):
            return prod.path
        log.warning("production model %s points to missing folder %s; using the bundled default %s", prod.id, prod.path, DEFAULT_MODEL_DIR)
    return str(DEFAULT_MODEL_DIR)
