import csv
import json

import pytest
from typer.testing import CliRunner

from pipeline.cli import app

runner = CliRunner()
TEXTS = ["Operating profit rose to EUR 13.1 mn", "Shares plunged after the profit warning", "The AGM is on Friday"]


@pytest.mark.parametrize("suffix", [".txt", ".csv", ".jsonl"])
def test_score_file_writes_label_and_every_probability(tmp_path, tiny_model_dir, suffix):
    src = tmp_path / f"in{suffix}"
    if suffix == ".txt":
        src.write_text("\n".join(TEXTS) + "\n\n")
    elif suffix == ".csv":
        with src.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["id", "text"])
            w.writerows([[i, t] for i, t in enumerate(TEXTS)])
    else:
        src.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    out_csv, out_jsonl = tmp_path / "out.csv", tmp_path / "out.jsonl"
    for out in (out_csv, out_jsonl):
        res = runner.invoke(app, ["score", str(src), "-o", str(out), "--model", str(tiny_model_dir)])
        assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(out_csv.open()))
    assert [r["text"] for r in rows] == TEXTS
    for r in rows:
        probs = [float(r[f"p_{k}"]) for k in ("negative", "neutral", "positive")]
        assert abs(sum(probs) - 1) < 1e-3
        assert r["label"] == ("negative", "neutral", "positive")[probs.index(max(probs))]
        assert r["topic"] in ("Earnings", "Legal")
    lines = [json.loads(line) for line in out_jsonl.read_text().splitlines()]
    assert [x["label"] for x in lines] == [r["label"] for r in rows]


def test_score_bad_inputs_name_the_input(tmp_path, tiny_model_dir):
    res = runner.invoke(
        app, ["score", str(tmp_path / "missing.txt"), "-o", str(tmp_path / "o.csv"), "--model", str(tiny_model_dir)]
    )
    assert res.exit_code == 2 and "missing.txt" in res.output
    bad = tmp_path / "bad.csv"
    bad.write_text("headline\nx\n")
    res = runner.invoke(app, ["score", str(bad), "-o", str(tmp_path / "o.csv"), "--model", str(tiny_model_dir)])
    assert res.exit_code == 2 and "'text' column" in res.output
    latin = tmp_path / "latin.txt"
    latin.write_bytes("Nokia's profit \xe4 rose".encode("latin-1"))
    res = runner.invoke(app, ["score", str(latin), "-o", str(tmp_path / "o.csv"), "--model", str(tiny_model_dir)])
    assert res.exit_code == 2 and "not UTF-8" in res.output


def test_missing_or_corrupt_model_names_the_path(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("hello\n")
    res = runner.invoke(app, ["score", str(src), "-o", str(tmp_path / "o.csv"), "--model", str(tmp_path / "no-model")])
    assert res.exit_code == 1 and "model folder not found" in res.output and "no-model" in res.output
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    res = runner.invoke(app, ["score", str(src), "-o", str(tmp_path / "o.csv"), "--model", str(broken)])
    assert res.exit_code == 1 and "broken" in res.output and not (tmp_path / "o.csv").exists()


def test_bench_prints_and_writes_its_report(tmp_path, tiny_model_dir, pg_url):
    """One run measures finsent, the naive pipeline, the hand loop and the write path, and keeps detect.* keys."""
    report = tmp_path / "bench"
    report.with_suffix(".json").write_text(json.dumps({"detect": {"entities_10000_seconds": 4.2}}))
    args = [
        "bench",
        "--model",
        str(tiny_model_dir),
        "-n",
        "12",
        "--rounds",
        "2",
        "--batch-size",
        "4",
        "--report",
        str(report),
    ]
    res = runner.invoke(app, [*args, "--database-url", pg_url, "--db-rows", "300"])
    assert res.exit_code == 0, res.output
    data = json.loads(report.with_suffix(".json").read_text())
    assert {r["method"] for r in data["scoring"]} == {"finsent", "finsent_int8", "naive_pipeline", "hand_loop"}
    assert data["precision"] == "fp32"  # model.precision's default: the headline ratios are fp32's
    assert set(data["cpu_side_us_per_text"]) == {"finsent", "hand_loop", "tokenizer_call", "rust_encode_alone"}
    assert all(v > 0 for v in data["cpu_side_us_per_text"].values())
    assert all(r["texts"] == 12 and len(r["rounds_texts_per_s"]) == 2 and r["texts_per_s"] > 0 for r in data["scoring"])
    assert set(data["ratios"]) == {"vs_naive_pipeline", "vs_hand_loop", "db_writes_vs_copy"}
    assert all(v > 0 for v in data["ratios"].values()) and data["detect"] == {"entities_10000_seconds": 4.2}
    assert [w["rows"] for w in data["db_writes"]] == [900] * 4  # 300 documents + 300 entities + 300 scores, each round
    assert "ratios.vs_hand_loop" in res.output and "`ratios.db_writes_vs_copy`" in report.with_suffix(".md").read_text()
    res = runner.invoke(app, [*args, "--database-url", "none"])
    assert res.exit_code == 0, res.output
    kept = json.loads(report.with_suffix(".json").read_text())
    assert kept["ratios"]["db_writes_vs_copy"] == data["ratios"]["db_writes_vs_copy"]  # a skipped part keeps its figure


def test_score_uses_the_production_model_like_run(tmp_path, tiny_model_dir, monkeypatch):
    from pipeline import store
    from tests.conftest import make_tiny_model

    prod = make_tiny_model(tmp_path / "prod-model", seed=1)
    url = f"sqlite:///{tmp_path / 'reg.db'}"
    store.upgrade(url)
    engine = store.make_engine(url)
    with store.session_scope(engine) as session:
        store.register_model(
            session,
            "tiny-1",
            name="tiny-1",
            path=str(prod),
            labels=["negative", "neutral", "positive"],
            is_production=True,
        )
    engine.dispose()
    monkeypatch.setenv("DATABASE_URL", url)
    monkeypatch.delenv("FINSENT_MODEL", raising=False)
    src = tmp_path / "in.txt"
    src.write_text("Shares fell\n")
    res = runner.invoke(app, ["score", str(src), "-o", str(tmp_path / "o.csv")])
    assert res.exit_code == 0, res.output
    assert "with tiny-1" in res.output


def test_score_keeps_every_input_column_and_gives_tricky_rows_no_sentiment(tmp_path, tiny_model_dir):
    import pyarrow.parquet as pq

    src = tmp_path / "tricky.csv"
    rows = [
        ("a1", ""),
        ("a2", "   "),
        ("a3", "苹果公司股价暴跌"),
        ("a4", "Die Aktie bricht nach Gewinnwarnung ein"),
        ("a5", TEXTS[1]),
    ]
    with src.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "text", "desk"])
        w.writerows([[i, t, "fx"] for i, t in rows])
    out = tmp_path / "out.parquet"
    res = runner.invoke(app, ["score", str(src), "-o", str(out), "--model", str(tiny_model_dir)])
    assert res.exit_code == 0, res.output
    assert "scored 1 of 5" in res.output and "2 skipped_empty" in res.output and "2 skipped_language" in res.output
    got = pq.read_table(out).to_pylist()  # real Parquet: pyarrow reads it back
    assert [r["id"] for r in got] == ["a1", "a2", "a3", "a4", "a5"] and {r["desk"] for r in got} == {"fx"}
    assert [r["status"] for r in got] == ["skipped_empty"] * 2 + ["skipped_language"] * 2 + ["scored"]
    assert [r["label"] for r in got[:4]] == ["none"] * 4 and got[4]["label"] in ("negative", "neutral", "positive")
    assert all(r["p_neutral"] is None and r["reason"] for r in got[:4]) and [r["language"] for r in got[2:]] == [
        "zh",
        "de",
        "en",
    ]
    jsonl = tmp_path / "out.jsonl"
    src_jsonl = tmp_path / "in.jsonl"
    src_jsonl.write_text(json.dumps({"id": 7, "text": TEXTS[0], "meta": {"k": 1}}) + "\n")
    res = runner.invoke(app, ["score", str(src_jsonl), "-o", str(jsonl), "--model", str(tiny_model_dir)])
    assert res.exit_code == 0, res.output
    line = json.loads(jsonl.read_text())
    assert line["id"] == 7 and line["meta"] == {"k": 1} and line["status"] == "scored"


def test_score_refuses_unknown_output_extensions_and_clashing_columns(tmp_path, tiny_model_dir):
    src = tmp_path / "in.txt"
    src.write_text(TEXTS[0] + "\n")
    for name in ("out.xlsx", "out"):
        res = runner.invoke(app, ["score", str(src), "-o", str(tmp_path / name), "--model", str(tiny_model_dir)])
        assert res.exit_code == 2 and f"output {tmp_path / name}: unknown extension" in res.output
        assert ".parquet" in res.output and "Traceback" not in res.output and not (tmp_path / name).exists()
    gold = tmp_path / "gold.csv"
    gold.write_text("text,label\nShares fell,negative\n")
    res = runner.invoke(app, ["score", str(gold), "-o", str(tmp_path / "o.csv"), "--model", str(tiny_model_dir)])
    assert res.exit_code == 2 and "label" in res.output and "rename" in res.output


_SCORE_FILE_IN_SUBPROCESS = """
import json, resource, sys
from pipeline.cli import app
try:
    app(["score", sys.argv[1], "-o", sys.argv[2], "--model", sys.argv[3]])
except SystemExit as e:
    assert not e.code, e.code
print(json.dumps({"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _peak_rss_scoring(tmp_path, model, n: int) -> float:
    import subprocess
    import sys
    from pathlib import Path

    src, out = tmp_path / f"in{n}.csv", tmp_path / f"out{n}.jsonl"
    with src.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "text", "note"])
        w.writerows([i, f"{TEXTS[i % 3]} {i}", "x" * 4000] for i in range(n))
    root = Path(__file__).resolve().parents[1]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, "-c", _SCORE_FILE_IN_SUBPROCESS, str(src), str(out), str(model)],
        check=False,
        capture_output=True,
        text=True,
        cwd=root,
        env=env,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    lines = out.read_text().splitlines()
    assert len(lines) == n and json.loads(lines[-1])["id"] == str(n - 1)  # every row, in order
    return json.loads(res.stdout.strip().splitlines()[-1])["rss_mb"]


def test_score_streams_a_file_in_flat_memory(tmp_path, tiny_model_dir):
    """20,000 rows cost about what 2,000 do: read, scored and written a chunk (model.chunk_size) at a time.
    Held whole (before streaming), the 18,000 extra rows (a 4,000-character column, outcome, output record) took
    ~115 MB more; the bound leaves room for the allocator's noise (+-40 MB between identical runs here)."""
    small = _peak_rss_scoring(tmp_path, tiny_model_dir, 2_000)
    large = _peak_rss_scoring(tmp_path, tiny_model_dir, 20_000)
    assert large < small + 60, (small, large)
