from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config

GOOD = """
database_url: postgresql+psycopg://finsent:s3cret@db.internal/finsent
sources:
  - name: wire
    kind: rss
    url: https://example.com/feed.xml
watchlist:
  - ticker: NWB
    name: Northwind Bank
    aliases: [Northwind]
detect:
  window_minutes: 30
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "finsent.yaml"
    p.write_text(text)
    return p


def test_good_config_loads_and_hides_password(tmp_path, monkeypatch):
    monkeypatch.delenv("DATABASE_URL", raising=False)
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.sources[0].name == "wire"
    assert cfg.watchlist[0].key == "NWB"
    assert cfg.detect.window_minutes == 30
    assert "s3cret" not in repr(cfg)
    assert "s3cret" not in str(cfg.model_dump())
    assert cfg.database_url.get_secret_value().endswith("@db.internal/finsent")


def test_typo_names_file_key_and_hint(tmp_path):
    p = write(tmp_path, GOOD.replace("window_minutes", "window_minuts"))
    with pytest.raises(ConfigError) as e:
        load_config(p, env=False)
    msg = str(e.value)
    assert str(p) in msg and "detect.window_minuts" in msg and "unknown key" in msg


def test_bad_value_names_key_and_expectation(tmp_path):
    p = write(tmp_path, GOOD.replace("kind: rss", "kind: telegram"))
    with pytest.raises(ConfigError) as e:
        load_config(p, env=False)
    assert "sources.0.kind" in str(e.value) and "'rss'" in str(e.value) and "telegram" in str(e.value)


def test_bad_url_and_duplicate_sources(tmp_path):
    p = write(tmp_path, GOOD.replace("https://example.com/feed.xml", "ftp://x"))
    with pytest.raises(ConfigError, match=r"sources\.0: .*source 'wire': url must start with http"):
        load_config(p, env=False)
    dup = GOOD.replace("watchlist:", "  - name: wire\n    url: https://example.com/2.xml\nwatchlist:")
    with pytest.raises(ConfigError, match="duplicate source names: wire"):
        load_config(write(tmp_path, dup), env=False)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "sources: [\n"))
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_env_overrides_secret_and_model(tmp_path, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", "postgresql+psycopg://u:envpass@h/db")
    monkeypatch.setenv("FINSENT_MODEL", "ProsusAI/finbert")
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.database_url.get_secret_value() == "postgresql+psycopg://u:envpass@h/db"
    assert cfg.model.path == "ProsusAI/finbert"
