import pytest

from pipeline import orchestrate


def test_score_shards_from_env(monkeypatch):
    monkeypatch.delenv("FINSENT_SCORE_SHARDS", raising=False)
    assert orchestrate.score_shards() == [0]
    monkeypatch.setenv("FINSENT_SCORE_SHARDS", "4")
    assert orchestrate.score_shards() == [0, 1, 2, 3]
    for bad in ("0", "two"):
        monkeypatch.setenv("FINSENT_SCORE_SHARDS", bad)
        with pytest.raises(orchestrate.OrchestrationError, match="FINSENT_SCORE_SHARDS"):
            orchestrate.score_shards()


def test_merge_scored_sums_shards_and_flags_failures():
    parts = [{"model_version": "m1", "scored": 3, "seconds": 1.0}, {"model_version": "m1", "scored": 4, "seconds": 2.5}]
    assert orchestrate.merge_scored(parts) == {"model_version": "m1", "scored": 7, "seconds": 2.5}
    assert orchestrate.merge_scored(parts[0]) == parts[0]
    assert orchestrate.merge_scored([parts[0], None]) is None
    with pytest.raises(orchestrate.OrchestrationError, match="different models"):
        orchestrate.merge_scored([parts[0], {**parts[1], "model_version": "m2"}])
