"""`finsent demo` as a new user meets it: every command it prints works when run as printed, in the same
folder, through the real `finsent` script."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "FINSENT_CONFIG")}
    env.update(
        PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", FINSENT_LOG_LEVEL="WARNING", COLUMNS="200"
    )
    return env


def _finsent() -> str:
    return str(Path(sys.executable).with_name("finsent"))


def test_every_command_the_demo_prints_works_as_printed(tmp_path: Path) -> None:
    env = _env()
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    demo = subprocess.run(
        [_finsent(), "demo"], cwd=tmp_path, env=env, capture_output=True, text=True, check=False, timeout=600
    )
    assert demo.returncode == 0, demo.stderr[-2000:]
    out = demo.stdout
    steps = [
        line.strip()
        for line in out.split("Next steps", 1)[1].splitlines()[1:]
        if line.strip().startswith(("finsent ", "DATABASE_URL="))
    ]
    acks = re.findall(
        r"^Acknowledge: (finsent alerts ack \w+)", out, flags=re.MULTILINE
    )  # printed by the console alert
    assert len(steps) >= 5 and acks, out[-3000:]
    assert any(s.startswith("finsent alerts ack") for s in steps) and any(
        s.startswith("finsent explain") for s in steps
    )
    for cmd in [*steps, *acks]:
        res = subprocess.run(
            ["bash", "-c", cmd], cwd=tmp_path, env=env, capture_output=True, text=True, check=False, timeout=300
        )
        assert res.returncode == 0, (cmd, res.stdout[-1000:], res.stderr[-1000:])
        assert "Traceback" not in res.stderr, cmd
        if cmd.startswith("finsent alerts list"):
            assert "Northwind" in res.stdout or "NWB" in res.stdout, res.stdout
    # The demo's database is the one every command opens by default; a rerun recreates it ...
    assert (tmp_path / "finsent.db").exists()
    # ... and `alerts list` without --since-hours says what it hid and how to see it.
    res = subprocess.run(
        [_finsent(), "alerts", "list"], cwd=tmp_path, env=env, capture_output=True, text=True, check=False, timeout=120
    )
    assert res.returncode == 0 and "older alert(s)" in res.stdout and "--since-hours" in res.stdout, res.stdout
    bad = subprocess.run(
        [_finsent(), "alerts", "list", "--scope", "entiy"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert bad.returncode == 2 and "entiy" in bad.stderr


def test_the_demo_refuses_to_overwrite_a_real_database(tmp_path: Path) -> None:
    from pipeline import store
    from pipeline.store import schema as s

    db = tmp_path / "finsent.db"
    url = f"sqlite:///{db}"
    store.upgrade(url)
    engine = store.make_engine(url)
    with store.session_scope(engine) as session:
        session.add(s.Source(name="desk-feed", kind="rss", url="https://feeds.example.com/desk.xml"))
    engine.dispose()
    res = subprocess.run(
        [_finsent(), "demo"], cwd=tmp_path, env=_env(), capture_output=True, text=True, check=False, timeout=300
    )
    assert res.returncode == 2 and "holds real feeds" in res.stderr and "Traceback" not in res.stderr
    assert db.stat().st_size > 0
