"""The model-health replay of tests/test_model_health.py, summarised for the README's figures.

Run: `python -m tests.model_health_replay` (needs the test Postgres; each scenario gets its own schema).
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select

from pipeline import store
from pipeline.store import schema as s
from pipeline.store import session_scope
from tests import test_model_health as t
from tests.conftest import migrated_schema


def summarise(shift: str) -> None:
    hours = 7 * 24 if shift == "none" else 4 * 24
    shifted = None if shift == "none" else dict.fromkeys(range(72, 80), t.SHIFTS[shift])
    with migrated_schema() as url:
        eng = store.make_engine(url)
        cfg = t.make_cfg()
        t.seed(eng, cfg, hours, shifted=shifted, rng_seed=11 if shift == "none" else 7)
        for h in range(1, hours + 1):
            t.check_models(eng, cfg, t.START + timedelta(hours=h), t.VERSION)
        with session_scope(eng) as ses:
            W = s.ModelHealthWindow
            judged = ses.scalars(select(W).where(W.drifted.is_not(None))).all()

            def hour(w: s.ModelHealthWindow) -> float:
                return (w.window_start - t.START).total_seconds() / 3600

            normal = [w for w in judged if not (shifted and w.source_name == "newswire" and hour(w) in shifted)]
            drifted = [w for w in judged if w.drifted]
            print(
                f"shift={shift}: judged source-windows {len(judged)}, drifted {len(drifted)} "
                f"(in normal data {sum(bool(w.drifted) for w in normal)}; max PSI there "
                f"{max(w.psi or 0 for w in normal):.3f})"
            )
            for w in drifted:
                print(f"  drifted {w.source_name} hour {hour(w):.0f}: {w.feature} PSI {w.psi} p={w.p_value:.2g}")
            for a in ses.scalars(select(s.Alert).where(s.Alert.scope_kind == "model").order_by(s.Alert.created_at)):
                at = (a.created_at - t.START).total_seconds() / 3600
                print(
                    f"  alert {a.kind} {a.scope_value} at hour {at:.0f}: {(a.details or {}).get('feature')} PSI "
                    f"{a.statistic}"
                )
        eng.dispose()


if __name__ == "__main__":
    for name in ("none", *t.SHIFTS):
        summarise(name)
