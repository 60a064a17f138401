"""`finsent --help` stays cheap: the CLI modules import SQLAlchemy (and the model stack) only inside commands."""

import subprocess
import sys
from pathlib import Path


def test_help_imports_neither_sqlalchemy_nor_torch():
    probe = (
        "import sys; from pipeline.cli import app; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'sqlalchemy', 'torch', 'transformers'}))"
    )
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=root, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "[]"
    res = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "--help"], capture_output=True, text=True, cwd=root, check=False
    )
    assert res.returncode == 0 and "score" in res.stdout and "bench" in res.stdout, res.stderr[-2000:]
