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


def test_a_missing_shard_result_is_a_failed_score_step():
    part = {"model_version": "m1", "scored": 3, "seconds": 1.0}
    assert orchestrate.merge_scored([part], expected=2) is None  # Airflow omits a failed shard's result
    assert orchestrate.merge_scored([part, part], expected=2)["scored"] == 6


def test_shards_spread_over_the_visible_gpus(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)  # no GPU here: only the count is faked
    assert [orchestrate.shard_device(None, i) for i in range(5)] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3", "cuda:0"]
    assert orchestrate.shard_device("cuda", 6) == "cuda:2"
    assert orchestrate.shard_device("cpu", 1) == "cpu" and orchestrate.shard_device("cuda:1", 3) == "cuda:1"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert orchestrate.shard_device(None, 3) is None
