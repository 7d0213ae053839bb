"""Model folders that are not what they seem: a checkpoint without its tokenizer, remote code in a tokenizer config
(refused, or never copied into what bertino saves)."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
from helpers import ROOT, train_config, train_error_line, write_config

sys.path.insert(0, str(ROOT))
import train  # noqa: E402
from bertino import SentenceEncoder  # noqa: E402
from bertino.errors import CheckpointError  # noqa: E402


def test_a_model_folder_without_tokenizer_files_is_refused(tiny_model_dir, tmp_path, capsys):
    folder = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_model_dir, folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match=f"{folder}: the tokenizer has 5 tokens but the embedding matrix has "
                                              r"\d+ rows: its tokenizer files are missing"):
        SentenceEncoder.from_pretrained(folder)
    line = train_error_line(capsys, write_config(tmp_path, train_config(tmp_path, folder)))
    assert str(folder) in line and "tokenizer files are missing" in line


def test_an_auto_map_is_not_copied_into_the_saved_model(tiny_model_dir, tmp_path):
    folder = tmp_path / "remote"
    shutil.copytree(tiny_model_dir, folder)
    tok = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**tok, "auto_map": {
        "AutoTokenizer": ["evil.EvilTokenizer", None]}}))
    train.main(["--config", str(write_config(tmp_path, train_config(tmp_path, folder)))])
    saved = json.loads((tmp_path / "run" / "final" / "tokenizer_config.json").read_text())
    assert "auto_map" not in saved and saved.get("do_lower_case") == tok.get("do_lower_case")
