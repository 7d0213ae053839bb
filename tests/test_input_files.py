"""Input files as users write them: blank eval texts, a CoSENT task whose gold scores are all equal, CSV columns of
digits, byte-order marks — each one line naming the file and the row, or read as the user meant."""

from __future__ import annotations

import json
import math
import sys

import pytest
from helpers import (ROOT, read_metrics, retrieval_rows, sts_rows, train_config, train_error_line, write_config,
                     write_jsonl)

sys.path.insert(0, str(ROOT))
import train  # noqa: E402
from bertino.errors import DataError  # noqa: E402
from bertino.plumbing.config import load_config  # noqa: E402
from bertino.plumbing.data import load_tasks  # noqa: E402
from bertino.plumbing.eval_data import load_ir_file  # noqa: E402


@pytest.mark.parametrize("row", [{"query": "  ", "positive": "p"}, {"query": "q", "positive": ""},
                                 {"query": "q", "positive": ["p", " "]}])
def test_eval_files_refuse_empty_texts_with_file_and_line(tmp_path, row):
    path = write_jsonl(tmp_path / "dev.jsonl", [{"query": "a", "positive": "b"}, row])
    with pytest.raises(DataError, match=f"{path}:2: key .(query|positive). must be a non-empty"):
        load_ir_file(path)


def test_cosent_with_all_gold_scores_equal_is_an_error(tiny_model_dir, tmp_path, capsys):
    rows = [{**r, "score": 3.0} for r in sts_rows(12)]
    cfg = train_config(tmp_path, tiny_model_dir)
    cfg["tasks"] = {"sts": {"dataset": str(write_jsonl(tmp_path / "flat.jsonl", rows)),
                            "columns": ["sentence1", "sentence2", "score"], "loss": "cosent"}}
    line = train_error_line(capsys, write_config(tmp_path, cfg))
    assert "every gold score in column 'score' is 3.0; 'cosent' learns only from pairs whose scores differ" in line
    assert not (tmp_path / "run").exists()


def test_a_csv_text_column_of_digits_is_read_as_text(tiny_model_dir, tmp_path):
    """Queries "0100", "0101", ...: read as the strings they are (a number would lose the leading zero), and
    trained on as such."""
    rows = retrieval_rows(24)
    lines = ["query,positive,negative_1,negative_2"] + [f"0{100 + i},{r['positive']},{r['negative_1']},"
                                                        f"{r['negative_2']}" for i, r in enumerate(rows)]
    (tmp_path / "digits.csv").write_text("\n".join(lines) + "\n")
    cfg = train_config(tmp_path, tiny_model_dir)
    cfg["tasks"]["retrieval"]["dataset"] = str(tmp_path / "digits.csv")
    config = write_config(tmp_path, cfg)
    data = load_tasks(load_config(config))["retrieval"]
    assert [row[0] for row in data.text_rows()] == [f"0{100 + i}" for i in range(24)]
    train.main(["--config", str(config)])
    steps = [r for r in read_metrics(tmp_path / "run") if "loss/retrieval" in r]
    assert len(steps) == 3 and all(math.isfinite(r["loss/retrieval"]) for r in steps)


def test_a_utf8_bom_is_accepted_in_eval_files_and_configs(tiny_model_dir, tmp_path):
    path = tmp_path / "dev.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"query": "q", "positive": "p"}\n{"query": "r", "positive": "s"}\n')
    assert load_ir_file(path).queries == ["q", "r"]
    config = tmp_path / "bom.json"
    config.write_bytes(b"\xef\xbb\xbf" + json.dumps(train_config(tmp_path, tiny_model_dir)).encode())
    assert load_config(config).train.max_steps == 3
