"""Errors that help (#9.11, #10.7): every command turns a storage failure into one line naming the database
(password hidden) and the cause in words, exit 1; config/usage errors exit 2; `--debug` adds the traceback.
Each failure is real: a database that does not exist, a refused port, a read-only and a full SQLite file.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import event
from typer.testing import CliRunner

import pipeline
from pipeline import store
from pipeline.cli import app
from pipeline.errors import FinsentError
from pipeline.records import Document
from pipeline.store import schema as s

runner = CliRunner()
PG = "postgresql+psycopg://postgres:s3cret-pw@127.0.0.1"

# Every command that opens the database, with arguments that get it as far as its first query.
COMMANDS = [
    ["run"],
    ["db", "upgrade"],
    ["alerts", "list"],
    ["alerts", "show", "abcdef123"],
    ["alerts", "ack", "abcdef123"],
    ["label", "1", "negative"],
    ["models", "list"],
    ["explain", "1"],
]


def _invoke(args: list[str], url: str, debug: bool = False):
    return runner.invoke(app, [*(["--debug"] if debug else []), *args], env={"DATABASE_URL": url, "FINSENT_CONFIG": ""})


def _one_error_line(res, expected: str) -> str:
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 1, res.output
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    assert lines[0].startswith("error: database ") and lines[0].endswith(expected), res.output
    assert "s3cret" not in res.output
    return lines[0]


@pytest.mark.pg
@pytest.mark.parametrize("args", COMMANDS, ids=" ".join)
def test_database_that_does_not_exist(args):
    line = _one_error_line(_invoke(args, f"{PG}:5432/finsent_no_such_db"), "database does not exist")
    assert "postgres:***@127.0.0.1:5432/finsent_no_such_db" in line


@pytest.mark.parametrize("args", COMMANDS, ids=" ".join)
def test_refused_connection(args):
    _one_error_line(_invoke(args, f"{PG}:1/finsent"), "connection refused")


@pytest.mark.parametrize("args", [a for a in COMMANDS if a != ["db", "upgrade"]], ids=" ".join)
def test_database_never_migrated(tmp_path, args):
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    sqlite3.connect(tmp_path / "empty.db").close()
    _one_error_line(_invoke(args, url), "not migrated: run `finsent db upgrade`")


def test_read_only_file(tmp_path):
    """Opened read-only (tests run as root, so a chmod would not stop a write)."""
    path = tmp_path / "ro.db"
    store.upgrade(f"sqlite:///{path}")
    url = f"sqlite:///file:{path}?mode=ro&uri=true"
    _one_error_line(_invoke(["run"], url), "read-only file")
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()
    _one_error_line(_invoke(["db", "upgrade"], f"sqlite:///file:{empty}?mode=ro&uri=true"), "read-only file")


def test_missing_folder(tmp_path):
    _one_error_line(
        _invoke(["alerts", "list"], f"sqlite:///{tmp_path / 'no' / 'such' / 'x.db'}"),
        "(missing folder or permission denied)",
    )


def test_disk_full(tmp_path):
    """SQLite's own SQLITE_FULL, provoked by capping the file's page count (no filesystem to fill)."""
    url = f"sqlite:///{tmp_path / 'full.db'}"
    store.upgrade(url)
    engine = store.make_engine(url)

    @event.listens_for(engine, "connect")
    def _cap(dbapi_conn, _rec):
        dbapi_conn.execute("PRAGMA max_page_count = 40")

    docs = [Document("wire", f"id-{i}", f"h{i}", "x" * 2000, "y" * 2000, None, pipeline_time()) for i in range(200)]
    with pytest.raises(store.StoreError) as err, store.session_scope(engine) as session:
        session.execute(
            s.Source.__table__.insert().values(name="wire", kind="rss", url="http://x", created_at=pipeline_time())
        )
        store.save_documents(session, docs)
    engine.dispose()
    assert str(err.value) == f"database {url}: disk full"


def pipeline_time():
    from datetime import UTC, datetime

    return datetime(2026, 3, 2, tzinfo=UTC)


def test_debug_shows_the_traceback_and_the_same_line():
    res = _invoke(["alerts", "list"], f"{PG}:1/finsent", debug=True)
    assert res.exit_code == 1
    assert "Traceback (most recent call last)" in res.output and "StoreError" in res.output
    assert res.output.rstrip().splitlines()[-1].endswith("connection refused")
    assert "s3cret" not in res.output


def test_config_error_exits_2_in_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sources: [{name: x, url: ftp://nowhere}]\n")
    res = runner.invoke(app, ["run", "-c", str(bad)])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert res.output.startswith(f"error: invalid config {bad}:"), res.output


def test_model_load_error_exits_1_in_one_line(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("profit rose\n")
    res = runner.invoke(
        app, ["score", str(src), "-o", str(tmp_path / "out.csv"), "--model", str(tmp_path / "no-model")]
    )
    lines = res.output.strip().splitlines()
    assert res.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: ") and "no-model" in lines[0], (
        res.output
    )


def test_every_exception_class_derives_from_finsent_error():
    """One base, so the CLI handler and callers catch one thing (private helpers inside a module excepted)."""
    found = {}
    for mod in pkgutil.walk_packages(pipeline.__path__, "pipeline."):
        if mod.name.startswith("pipeline.demo_data"):
            continue
        module = importlib.import_module(mod.name)
        for name, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__ == mod.name and not name.startswith("_"):
                found[f"{mod.name}.{name}"] = issubclass(obj, FinsentError)
    assert {"pipeline.config.ConfigError", "pipeline.store.errors.StoreError", "pipeline.acks.AckError"} <= set(found)
    assert [name for name, ok in found.items() if not ok] == []


def test_no_command_keeps_its_own_catch_all():
    src = "\n".join(p.read_text() for p in (Path(pipeline.__file__).parent / "commands").glob("*.py"))
    assert "except Exception" not in src and "(StoreError, Exception)" not in src
