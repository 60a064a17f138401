"""Core commands: demo, run, db upgrade|maintain, score."""

from __future__ import annotations

import csv
import json
import logging
import sys
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from pipeline.config import ConfigError, FinsentConfig, load_config
from pipeline.errors import FinsentError, UsageError
from pipeline.records import AlertKind

log = logging.getLogger("finsent")
console = Console()
err_console = Console(stderr=True, soft_wrap=True)  # error lines stay whole for logs and grep

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config", "-c", envvar="FINSENT_CONFIG", help="YAML config file (sources, watchlist, thresholds, sinks)."
    ),
]


def fail(message: str, code: int = 2) -> FinsentError:
    """An expected failure for the CLI's one handler (pipeline.cli): `raise fail(...)`; exit 2 (usage) by default."""
    err = UsageError(message) if code == 2 else FinsentError(message)
    err.exit_code = code
    return err


def config_or_exit(path: Path | None) -> FinsentConfig:
    """The config; a ConfigError reaches the CLI's one handler (one line, exit 2)."""
    return load_config(path)


def parse_time(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise fail(f"--as-of {value!r}: expected an ISO 8601 time such as 2026-11-20T15:00Z") from None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def production_or_configured_model(cfg: FinsentConfig) -> str:
    """The model `finsent run` would use (registry's production model when the database has one), so
    analysts score files with the same model as production; the configured/bundled one otherwise."""
    from sqlalchemy.engine import make_url

    from pipeline import cycle, store

    url = cfg.database_url.get_secret_value()
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and not (parsed.database and Path(parsed.database).exists()):
        return cfg.model.path
    engine = store.make_engine(url)
    try:
        store.check_schema(engine)
        return cycle.resolve_model(cfg, engine)
    except store.StoreError as e:
        log.info("scoring with the configured model: %s", e)
        return cfg.model.path
    finally:
        engine.dispose()


OUTPUT_FORMATS = (".csv", ".jsonl", ".ndjson", ".parquet")


def iter_rows(path: Path) -> Iterator[dict]:
    """Rows from a .txt (one text per line), .csv or .jsonl file with a `text` column, one at a time (a file of
    any size costs one row of memory); every column is kept. Bad input raises the CLI's one-line error."""
    if not path.exists():
        raise fail(f"input file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            with path.open(newline="", encoding="utf-8") as fh:
                reader = csv.DictReader(fh)
                if not reader.fieldnames or "text" not in reader.fieldnames:
                    raise fail(
                        f"{path}: CSV needs a 'text' column "
                        f"(found: {', '.join(reader.fieldnames or []) or 'no header'})"
                    )
                for row in reader:
                    yield {**row, "text": row["text"] or ""}
            return
        with path.open(encoding="utf-8") as fh:
            for n, raw in enumerate(fh, 1):
                line = raw.rstrip("\r\n")
                if not line.strip():
                    continue
                if suffix not in (".jsonl", ".ndjson"):
                    yield {"text": line}
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise fail(f"{path}:{n}: not valid JSON ({e.msg})") from None
                if not isinstance(obj, dict) or "text" not in obj:
                    raise fail(f"{path}:{n}: each JSON line needs a 'text' field")
                yield {**obj, "text": "" if obj["text"] is None else str(obj["text"])}
    except UnicodeDecodeError as e:
        raise fail(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_rows(path: Path) -> list[dict]:
    """Every row of `path` in memory (small files); `finsent score` streams with iter_rows instead."""
    return list(iter_rows(path))


def scan_columns(path: Path) -> list[str]:
    """Input columns in first-seen order, from one streaming pass that also validates the whole file, so a bad
    line fails before the model is loaded and no output is half-written."""
    columns: dict[str, None] = {}
    for row in iter_rows(path):
        if len(row) != len(columns) or not all(k in columns for k in row):
            columns.update(dict.fromkeys(row))
    return list(columns)


def chunked(rows: Iterable[dict], size: int) -> Iterator[list[dict]]:
    chunk: list[dict] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def read_texts(path: Path) -> list[str]:
    """Texts from a .txt (one per line), .csv or .jsonl file with a `text` column."""
    return [row["text"] for row in read_rows(path)]


def prediction_columns(labels: list[str], topics: bool) -> list[str]:
    return ["label", "status", "reason", "language", *(f"p_{lab}" for lab in labels)] + (
        ["topic", "topic_prob"] if topics else []
    )


def check_output_format(path: Path) -> None:
    """Refuse an output format finsent cannot write, before any work is done."""
    if path.suffix.lower() not in OUTPUT_FORMATS:
        raise fail(
            f"output {path}: unknown extension {path.suffix or '(none)'!r}; use one of {', '.join(OUTPUT_FORMATS)}"
        )


def check_output_columns(input_columns: list[str], labels: list[str], topics: bool) -> None:
    """Refuse input columns the predictions would overwrite."""
    clash = [c for c in input_columns if c in prediction_columns(labels, topics)]
    if clash:
        raise fail(f"input column(s) {', '.join(clash)} would be overwritten by the predictions: rename them")


def prediction_records(rows: list[dict], outcomes: list, labels: list[str], topics: bool) -> list[dict]:
    """Every input column, then label (`none` when not scored), status, reason, language and probabilities."""
    out = []
    for row, o in zip(rows, outcomes, strict=True):
        p = o.prediction
        rec = {**row, "label": o.label, "status": str(o.status), "reason": o.reason, "language": o.language}
        rec.update({f"p_{lab}": round(p.probs[lab], 6) if p else None for lab in labels})
        if topics:
            rec["topic"] = p.topic if p else None
            rec["topic_prob"] = round(p.topic_prob, 6) if p and p.topic_prob is not None else None
        out.append(rec)
    return out


class PredictionWriter:
    """Writes prediction records chunk by chunk (memory flat in the file size) to a temporary file next to
    `path`, renamed into place by `commit`, so a failed run never leaves a half-written output."""

    def __init__(self, path: Path, fields: list[str]) -> None:
        self.path, self.fields = path, fields
        self.suffix = path.suffix.lower()
        path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = path.with_name(f".{path.name}.part")
        self._fh: Any = None
        self._csv: csv.DictWriter | None = None
        self._parquet: Any = None
        self._schema: Any = None
        if self.suffix != ".parquet":
            self._fh = self.tmp.open("w", newline="", encoding="utf-8")
            if self.suffix == ".csv":
                self._csv = csv.DictWriter(self._fh, fieldnames=fields)
                self._csv.writeheader()

    def write(self, records: list[dict]) -> None:
        if self.suffix in (".jsonl", ".ndjson"):
            self._fh.writelines(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records)
        elif self.suffix == ".parquet":
            self._write_parquet(records)
        else:
            assert self._csv is not None
            self._csv.writerows(
                {k: json.dumps(v) if isinstance(v, dict | list) else v for k, v in rec.items()} for rec in records
            )

    def _write_parquet(self, records: list[dict]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            if self._parquet is None:  # the first chunk fixes the schema; columns null so far are strings
                inferred = pa.Table.from_pylist(records).schema
                self._schema = pa.schema(
                    [
                        pa.field(f, pa.string())
                        if f not in inferred.names or pa.types.is_null(inferred.field(f).type)
                        else inferred.field(f)
                        for f in self.fields
                    ]
                )
                self._parquet = pq.ParquetWriter(self.tmp, self._schema)
            self._parquet.write_table(pa.Table.from_pylist(records, schema=self._schema))
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
            self.abort()
            raise fail(
                f"output {self.path}: the input columns cannot be stored as Parquet ({str(e).splitlines()[0][:200]})"
            ) from None

    def _close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._parquet is not None:
            self._parquet.close()
            self._parquet = None

    def commit(self) -> None:
        if self.suffix == ".parquet" and self._parquet is None:  # no rows at all: still a readable file
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.table({f: pa.array([], pa.string()) for f in self.fields}), self.tmp)
        self._close()
        self.tmp.replace(self.path)

    def abort(self) -> None:
        self._close()
        self.tmp.unlink(missing_ok=True)


def write_predictions(path: Path, rows: list[dict], outcomes: list, labels: list[str], topics: bool) -> None:
    """All predictions of an in-memory list of rows in one go (see PredictionWriter for streaming)."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    writer = PredictionWriter(path, [*columns, *prediction_columns(labels, topics)])
    try:
        writer.write(prediction_records(rows, outcomes, labels, topics))
    except BaseException:
        writer.abort()
        raise
    writer.commit()


def print_demo(report) -> None:
    console.rule("[bold]finsent demo")
    t = Table(title="Items per source", show_edge=False)
    t.add_column("source")
    t.add_column("items", justify="right")
    for src, n in sorted(report.per_source.items()):
        t.add_row(Text(src), str(n))
    console.print(t)
    total = sum(report.sentiment_mix.values()) or 1
    mix = Table(title=f"Sentiment mix ({report.model_version})", show_edge=False)
    mix.add_column("label")
    mix.add_column("items", justify="right")
    mix.add_column("share", justify="right")
    for lab in ("negative", "neutral", "positive"):
        n = report.sentiment_mix.get(lab, 0)
        mix.add_row(lab, str(n), f"{n / total:.0%}")
    console.print(mix)
    neg = Table(title="Top negative headlines", show_edge=False)
    neg.add_column("p(neg)", justify="right")
    neg.add_column("source")
    neg.add_column("headline")
    for src, title, p in report.top_negative:
        neg.add_row(f"{p:.2f}", Text(src), Text(title))  # feed text is data, never rich markup
    console.print(neg)
    spikes = [a for a in report.alerts if a.kind != AlertKind.RESOLVED]
    console.print(f"\n[bold]{len(spikes)} alert(s)[/] for the window ending {report.as_of:%Y-%m-%d %H:%M} UTC:")
    for a in spikes:
        risk = f", risk {a.risk_score:.0f}/100" if a.risk_score is not None else ""
        console.print(
            f"  [{'red' if a.severity == 'critical' else 'yellow'}]{a.severity.upper()}[/] "
            f"{a.scope_kind} {escape(a.scope_value)}: "
            f"{a.neg_count}/{a.total_count} negative ({a.neg_share:.0%} vs baseline {a.baseline_share:.0%}){risk}"
        )
    if report.failed_sources:
        console.print(f"[red]failed sources:[/] {report.failed_sources}")
    if report.not_scored:
        console.print(
            "not scored: " + ", ".join(f"{k.replace('skipped_', '')} {v}" for k, v in sorted(report.not_scored.items()))
        )
    secs = report.seconds
    console.print(
        f"\nScored {report.scored} items. Wall time {secs['total']:.1f} s "
        f"(ingest {secs['ingest']:.1f} s, model load {secs['load_model']:.1f} s, score {secs['score']:.1f} s, "
        f"detect {secs['detect']:.1f} s, notify {secs['notify']:.1f} s). Database: {report.database_url}"
    )
    console.print(
        f"\nSee it in your browser: [bold]finsent serve --database-url {escape(report.database_url)}[/] "
        "then open http://127.0.0.1:8000/",
        highlight=False,
    )


db_app = typer.Typer(help="Database migrations and maintenance.", no_args_is_help=True)


def demo(
    db: Annotated[
        Path | None,
        typer.Option(
            help="SQLite file for the demo, recreated each run (default: the database every command uses, finsent.db)."
        ),
    ] = None,
    model: Annotated[str | None, typer.Option(help="Model folder or hub id (default: the bundled model).")] = None,
    keep: Annotated[bool, typer.Option(help="Keep the existing demo database instead of starting fresh.")] = False,
) -> None:
    """Run the whole loop offline on the bundled sample feeds: ingest, score, detect, alert."""
    from pipeline.config import DEFAULT_DATABASE_URL
    from pipeline.demo import next_steps, run_demo

    default_db = Path(DEFAULT_DATABASE_URL.removeprefix("sqlite:///"))
    path = db or default_db
    report = run_demo(path, model_path=model, fresh=not keep)  # a FinsentError is the CLI handler's one line
    print_demo(report)
    try:
        everyone = load_config(None).database_url.get_secret_value()  # what other commands will open
    except ConfigError:
        everyone = ""
    same = everyone == f"sqlite:///{path}" or (
        everyone == DEFAULT_DATABASE_URL and path.resolve() == default_db.resolve()
    )
    console.print("\n[bold]Next steps[/] (each works as printed, from this folder):")
    for cmd in next_steps(report, None if same else f"sqlite:///{path.resolve()}"):
        console.print(f"  {escape(cmd)}", highlight=False, soft_wrap=True)


def run(
    config: ConfigOpt = None,
    as_of: Annotated[
        str | None,
        typer.Option(help="Detect for the window ending at this UTC time (default: last complete window)."),
    ] = None,
) -> None:
    """One monitoring cycle over the configured sources against DATABASE_URL."""
    from pipeline import cycle
    from pipeline.detect import check_as_of

    cfg = config_or_exit(config)
    when = parse_time(as_of)
    if when is not None:
        try:
            check_as_of(when, cfg.detect.window_minutes)
        except ValueError as e:
            raise fail(f"--as-of: {e}") from None
    summary = cycle.run_cycle(cfg, as_of=when)
    console.print(
        f"run {summary.run_id}: {sum(summary.fetched.values())} new documents from {len(summary.fetched)} sources, "
        f"{summary.scored} scored, {len([a for a in summary.alerts if a.kind != 'resolved'])} alerts; "
        f"delivery: {escape(summary.delivery)}",
        highlight=False,
        soft_wrap=True,
    )
    if summary.not_scored:
        console.print(
            "not scored: "
            + ", ".join(f"{k.replace('skipped_', '')} {v}" for k, v in sorted(summary.not_scored.items()))
        )
    for src, error in summary.failed_sources.items():
        err_console.print(f"[red]source {escape(src)} failed:[/] {escape(error)}", highlight=False)
    for problem in summary.problems:  # an alert that did not reach anyone is worth a non-zero exit
        err_console.print(f"[red]degraded:[/] {escape(problem)}", highlight=False)
    if summary.problems:
        raise typer.Exit(4)
    if summary.failed_sources:
        raise typer.Exit(3)


def bench(
    model: Annotated[str | None, typer.Option(help="Model folder or hub id (default: config / bundled model).")] = None,
    n: Annotated[
        int, typer.Option("--texts", "-n", min=1, help="Texts per set (FPB, TFNS) and contender per round.")
    ] = 400,
    rounds: Annotated[int, typer.Option(min=1, help="Interleaved rounds; the median round is reported.")] = 3,
    batch_size: Annotated[
        int | None, typer.Option(min=1, help="finsent's batch size (default: model.batch_size).")
    ] = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda when available).")] = None,
    database_url: Annotated[
        str | None,
        typer.Option(
            help="Postgres for the write benchmark, in a throwaway schema "
            "(default: the config's when it is Postgres; 'none' skips)."
        ),
    ] = None,
    db_rows: Annotated[int, typer.Option(min=100, help="Documents (and scores) per write round.")] = 20_000,
    report: Annotated[Path, typer.Option(help="Report path without suffix (.md and .json are written).")] = Path(
        "docs/benchmark"
    ),
    precision: Annotated[
        str | None,
        typer.Option(
            help="fp32 or int8: whose ratios are the headline (default: model.precision). int8 counts only where "
            "it loses < 0.5 point of FPB and topic accuracy in this run."
        ),
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Measure finsent against the naive transformers pipeline, a hand-written torch loop and the
    idempotent COPY ceiling, in one run, and write the ratios to a report file."""
    import torch

    from pipeline.bench import (
        Report,
        cpu_side_us,
        headline_precision,
        run_bench,
        run_db_bench,
        text_sets,
        write_report,
    )
    from pipeline.precision import PRECISIONS, check_int8
    from pipeline.score import Scorer, default_threads

    cfg = config_or_exit(config)
    wanted = precision or cfg.model.precision
    if wanted not in PRECISIONS:
        raise fail(f"--precision {wanted}: expected one of {', '.join(PRECISIONS)}")
    torch.set_num_threads(cfg.model.threads or default_threads())
    path = model or cfg.model.path
    results, source = run_bench(path, n, rounds, batch_size or cfg.model.batch_size, device or cfg.model.device)
    sets, _ = text_sets(2000)
    scorer = Scorer.load(path, device="cpu", batch_size=batch_size or cfg.model.batch_size)
    cpu = cpu_side_us(scorer, next(iter(sets.values())))
    check = None
    if any(r.method == "finsent_int8" for r in results) and "fpb" in sets:
        check = check_int8(path)
    chosen, note = headline_precision(wanted, check)
    url = database_url or cfg.database_url.get_secret_value()
    rep = Report(
        command=("finsent bench " + " ".join(sys.argv[2:])).strip(),
        texts_source=source,
        scoring=results,
        precision=chosen,
        precision_note=note,
        cpu_side_us=cpu,
        int8=check,
    )
    if url.lower() == "none":
        rep.writes_note = "Not measured in this run (--database-url none)."
    elif not url.startswith("postgres"):
        rep.writes_note = "Not measured in this run: the write benchmark needs Postgres (--database-url)."
    else:
        rep.writes = run_db_bench(url, db_rows, rounds)
    meta = write_report(rep, report)
    console.print(f"texts: {source}", highlight=False)
    for r in results:
        console.print(
            f"{r.text_set}: {r.method} {r.texts_per_s:.1f} texts/s "
            f"(batch {r.batch_size}, {r.mean_tokens:.1f} tokens per text)"
        )
    for w in rep.writes:
        console.print(f"db writes: {w.method} {w.rows_per_s:.0f} rows/s")
    if rep.writes_note:
        console.print(rep.writes_note)
    for k, v in meta["ratios"].items():
        console.print(f"ratios.{k} = {v:.2f}")
    for k, v in cpu.items():
        console.print(f"cpu side (zero-cost model): {k} {v:.1f} us per text")
    if note:
        console.print(note, highlight=False)
    console.print(f"report: {report.with_suffix('.md')}")


def db_upgrade(config: ConfigOpt = None, revision: str = "head") -> None:
    """Apply schema migrations to DATABASE_URL (or the config's database_url)."""
    from pipeline.store import safe_url, upgrade

    cfg = config_or_exit(config)
    url = cfg.database_url.get_secret_value()
    upgrade(url, revision)
    console.print(f"database {safe_url(url)} is at revision {revision}")


def db_maintain(config: ConfigOpt = None) -> None:
    """Run the daily maintenance pass now (what the finsent_maintenance DAG runs): text retention
    (FINSENT_RETENTION_DAYS, retention.raw_social_text_days), rollup refresh, ANALYZE. Safe to rerun."""
    from pipeline.maintenance import run_maintenance
    from pipeline.store import check_schema, make_engine

    cfg = config_or_exit(config)
    engine = make_engine(cfg.database_url.get_secret_value())
    try:
        check_schema(engine)
        rep = run_maintenance(engine, social_text_days=cfg.retention.raw_social_text_days)
    finally:
        engine.dispose()
    social = (
        f"{rep.social_texts_purged} social posts purged (older than {rep.social_text_days} days)"
        if rep.social_text_days is not None
        else "social text kept (retention.raw_social_text_days not set)"
    )
    console.print(
        f"retention {rep.retention_days} days: {rep.texts_cleared} bodies cleared, {rep.fetch_logs_deleted} "
        f"fetch logs and {rep.delivery_attempts_deleted} delivery attempts deleted; {social}",
        highlight=False,
    )
    for hint in rep.vacuum_hints:
        console.print(f"hint: {hint}", highlight=False, markup=False)


def score(
    file: Annotated[Path, typer.Argument(help="Texts: .txt (one per line), .csv or .jsonl with a 'text' column.")],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Where to write predictions (.csv, .jsonl or .parquet).")
    ],
    model: Annotated[str | None, typer.Option(help="Model folder or hub id (default: config / bundled model).")] = None,
    config: ConfigOpt = None,
) -> None:
    """Score a file of texts, keeping every input column: label (`none` with a reason for empty or
    foreign-language texts), status, language, every class probability (and topic when the model has one)."""
    from pipeline import cycle
    from pipeline.records import ScoringStatus

    cfg = config_or_exit(config)
    check_output_format(output)
    columns = scan_columns(file)
    scorer = cycle.load_scorer(cfg, path=model or production_or_configured_model(cfg))  # the cycle's settings
    topics = bool(scorer.topics)
    check_output_columns(columns, scorer.labels, topics)
    writer = PredictionWriter(output, [*columns, *prediction_columns(scorer.labels, topics)])
    total = 0
    counts = dict.fromkeys(ScoringStatus, 0)
    try:  # read, score and write a chunk at a time: memory stays flat in the file size
        for rows in chunked(iter_rows(file), cfg.model.chunk_size):
            outcomes = scorer.assess([row["text"] for row in rows])
            writer.write(prediction_records(rows, outcomes, scorer.labels, topics))
            total += len(rows)
            for o in outcomes:
                counts[o.status] += 1
    except BaseException:
        writer.abort()
        raise
    writer.commit()
    skipped = {st: n for st, n in counts.items() if st != ScoringStatus.SCORED}
    note = ", ".join(f"{n} {st}" for st, n in skipped.items() if n)
    err_console.print(
        f"scored {counts[ScoringStatus.SCORED]} of {total} texts with {scorer.version} -> {output}"
        + (f" (not scored: {note})" if note else ""),
        highlight=False,
    )


def register(app: typer.Typer) -> None:
    app.command()(demo)
    app.command()(run)
    app.command()(bench)
    db_app.command("upgrade")(db_upgrade)
    db_app.command("maintain")(db_maintain)
    app.command()(score)
    app.add_typer(db_app, name="db")
