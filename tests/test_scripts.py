"""The small data scripts of the README."""

from __future__ import annotations

import json
import subprocess
import sys

from helpers import ROOT


def test_export_sts_from_a_saved_dataset(tmp_path):
    import datasets

    ds = datasets.DatasetDict({"dev": datasets.Dataset.from_dict(
        {"sentence1": ["Un gatto.", "Un cane."], "sentence2": ["Il gatto.", "Una casa."], "similarity_score": [4.5, 0.2]})})
    ds.save_to_disk(str(tmp_path / "sts"))
    out = tmp_path / "dev.jsonl"
    proc = subprocess.run([sys.executable, "scripts/export_sts.py", "--dataset", str(tmp_path / "sts"), "--split", "dev",
                           "--output", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [{"sentence1": "Un gatto.", "sentence2": "Il gatto.", "score": 4.5},
                    {"sentence1": "Un cane.", "sentence2": "Una casa.", "score": 0.2}]
    bad = subprocess.run([sys.executable, "scripts/export_sts.py", "--dataset", str(tmp_path / "sts"), "--split", "dev",
                          "--score-column", "nope", "--output", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "no column(s) ['nope']" in bad.stderr and "Traceback" not in bad.stderr
