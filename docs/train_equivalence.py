"""Same seeds, same model: train two tiny models and print a digest to compare across revisions.

Used for docs/architecture.md (the train_model split changed no result). Run it with each revision's
`pipeline` first on PYTHONPATH and the same work folder (it reuses the data and base it made first):

    PYTHONPATH=<checkout of REV> python docs/train_equivalence.py /tmp/eq > REV.out; diff A.out B.out

The digest (last line; the lines before it are the evaluations train_model prints) holds the saved
weights' sha256, the steps, the evaluation history and the temperature.
"""

import hashlib
import inspect
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from pipeline.train import TrainConfig, train_model
from tests.train_support import make_data_dir, make_tiny_base


def main(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    data = make_data_dir(root / "data") if not (root / "data").exists() else root / "data" / "data"
    base = make_tiny_base(root / "base") if not (root / "base").exists() else root / "base" / "tiny-base"
    callback = "on_eval" if "on_eval" in inspect.signature(train_model).parameters else "on_epoch"
    tiny = TrainConfig(base=str(base), limit=40, batch_size=16, max_length=32)
    runs = {
        "ema_patience": replace(tiny, max_steps=30, eval_every=3, patience=2, ema=0.9, seed=5),
        "plain": replace(tiny, epochs=2, seed=7, topic_weight=0.0),
    }
    out = {}
    for name, cfg in runs.items():
        folder = root / f"out-{name}"
        seen: list[float] = []
        hook: dict[str, Any] = {callback: lambda rec, seen=seen: seen.append(rec["step"])}
        r = train_model(folder, data, cfg, progress=False, **hook)
        weights = hashlib.sha256(b"".join(f.read_bytes() for f in sorted(folder.glob("*.safetensors"))))
        steps = json.loads((folder / "finsent.json").read_text())["training"]["steps"]
        out[name] = {"weights": weights.hexdigest()[:16], "steps": steps, "evals": seen, "history": r.history}
        out[name]["temperature"] = r.temperature
    sys.stdout.write(json.dumps(out, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
