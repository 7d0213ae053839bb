"""Pickle-only model folders (indigo-ai/BERTino is one) and bertino's conversion cache: every entry belongs to one
content and is verified before use, a damaged one is converted again, a killed conversion leaves nothing for long,
an unwritable cache still loads, and every broken file layout is one error that names the file."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT, write_jsonl
from safetensors.torch import load_file, save_file

from bertino import SentenceEncoder
from bertino.errors import CheckpointError

sys.path.insert(0, str(ROOT))
TEXTS = ["il gatto", "Chi ha dipinto la Gioconda?"]


def pickle_only(src: Path, dst: Path, shards: int = 1) -> Path:
    """src's model folder with its weights as pytorch_model.bin (or `shards` pickles and their index) only."""
    shutil.copytree(src, dst)
    state = load_file(str(dst / "model.safetensors"))
    (dst / "model.safetensors").unlink()
    if shards == 1:
        torch.save(state, dst / "pytorch_model.bin")
        return dst
    names = sorted(state)
    weight_map = {}
    for i in range(shards):
        part = {k: state[k] for k in names[i::shards]}
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        torch.save(part, dst / file)
        weight_map.update({k: file for k in part})
    (dst / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def embeddings(folder) -> np.ndarray:
    return SentenceEncoder.from_pretrained(folder).encode(TEXTS)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("BERTINO_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "converted"


def entries(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if not p.name.startswith(".")) if cache.is_dir() else []


def test_two_pickle_only_models_never_share_a_cache_entry(tiny_model_dir, tiny_mlm_dir, tmp_path, cache):
    """Same file names (pytorch_model.bin), different weights: two entries, each model its own embeddings (an
    entry keyed by the file names alone would hand the second model the first one's weights)."""
    a, b = pickle_only(tiny_model_dir, tmp_path / "a"), pickle_only(tiny_mlm_dir, tmp_path / "b")
    np.testing.assert_array_equal(embeddings(a), embeddings(tiny_model_dir))
    np.testing.assert_array_equal(embeddings(b), embeddings(tiny_mlm_dir))
    assert len(entries(cache)) == 2
    np.testing.assert_array_equal(embeddings(a), embeddings(tiny_model_dir))  # from the cache, still its own


def test_an_unwritable_cache_converts_in_memory_with_a_notice(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """BERTINO_CACHE that cannot be written (here: a path under a file; a read-only folder fails the same way):
    the model still loads, converted in memory, with one notice naming BERTINO_CACHE; no traceback."""
    folder = pickle_only(tiny_model_dir, tmp_path / "m")
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv("BERTINO_CACHE", str(tmp_path / "a-file" / "cache"))
    np.testing.assert_array_equal(embeddings(folder), embeddings(tiny_model_dir))
    err = capsys.readouterr().err
    assert "cannot write bertino's cache" in err and "BERTINO_CACHE" in err and "in memory" in err

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setenv("BERTINO_CACHE", str(tmp_path / "read-only"))
    monkeypatch.setattr(Path, "mkdir", denied)  # as a folder without write permission answers (root ignores chmod)
    np.testing.assert_array_equal(embeddings(folder), embeddings(tiny_model_dir))
    assert "Permission denied" in capsys.readouterr().err


def test_the_commands_load_a_pickle_only_model_with_an_unwritable_cache(tiny_model_dir, tmp_path, monkeypatch,
                                                                          capsys):
    """train.py, evaluate.py and python -m bertino.mine: no PermissionError traceback, they run."""
    import evaluate
    import train
    from helpers import retrieval_rows, train_config, write_config

    from bertino import mine

    folder = pickle_only(tiny_model_dir, tmp_path / "m")
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv("BERTINO_CACHE", str(tmp_path / "a-file" / "cache"))
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"query": r["query"], "positive": r["positive"]}
                                                   for r in retrieval_rows(12)])
    assert evaluate.run(["--model", str(folder), "--ir", str(pairs)]) == 0
    assert mine.run(["--model", str(folder), "--input", str(pairs), "--output", str(tmp_path / "mined.jsonl"),
                     "--num-negatives", "1", "--range-min", "0", "--range-max", "5", "--no-progress"]) == 0
    cfg = train_config(tmp_path, folder, max_steps=1)
    train.main(["--config", str(write_config(tmp_path, cfg))])
    err = capsys.readouterr().err
    assert err.count("cannot write bertino's cache") == 3 and "Traceback" not in err


def test_convert_into_a_read_only_folder_is_one_error_line(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from bertino import convert
    from bertino.plumbing import files

    folder = pickle_only(tiny_model_dir, tmp_path / "m")

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(files.tempfile, "mkstemp", denied)  # what a read-only folder answers (root ignores chmod)
    assert convert.run_cli(convert.main, [str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot write {folder / 'model.safetensors'}: Permission denied") and \
        "Traceback" not in err and len(err.splitlines()) == 1


def test_sharded_pickles_load_and_a_broken_index_names_its_file(tiny_model_dir, tmp_path, cache, capsys):
    from bertino import convert

    folder = pickle_only(tiny_model_dir, tmp_path / "sharded", shards=2)
    np.testing.assert_array_equal(embeddings(folder), embeddings(tiny_model_dir))
    index = folder / "pytorch_model.bin.index.json"
    shard = folder / "pytorch_model-00002-of-00002.bin"
    shard.rename(tmp_path / "away.bin")
    with pytest.raises(CheckpointError, match=f"{index}: its weight_map names the shard {shard.name}, but "
                                              f"{shard} does not exist"):
        embeddings(folder)
    capsys.readouterr()
    assert convert.run_cli(convert.main, [str(folder)]) == 2  # not blamed on torch.load
    err = capsys.readouterr().err
    assert f"names the shard {shard.name}" in err and "torch.load" not in err
    (tmp_path / "away.bin").rename(shard)
    index.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match=f'{index}: expected a "weight_map" object'):
        embeddings(folder)
    index.write_text(json.dumps({"weight_map": {"w": 3}}))
    with pytest.raises(CheckpointError, match="weight_map"):
        convert.main([str(folder)])
    st = tmp_path / "st-sharded"  # the same checks for sharded safetensors
    shutil.copytree(tiny_model_dir, st)
    (st / "model.safetensors").rename(st / "model-00001-of-00001.safetensors")
    (st / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-00009.safetensors"}}))
    with pytest.raises(CheckpointError, match="names the shard model-00009.safetensors, but .* does not exist"):
        embeddings(st)


def test_a_damaged_cache_entry_is_converted_again(tiny_model_dir, tiny_mlm_dir, tmp_path, cache, capsys):
    """Every load checks the entry's size and sha256: a truncated entry, or one whose file was replaced (here by
    another model's weights), is converted again with a notice, never blamed on the model folder."""
    folder = pickle_only(tiny_model_dir, tmp_path / "m")
    want = embeddings(tiny_model_dir)
    np.testing.assert_array_equal(embeddings(folder), want)
    (entry,) = entries(cache)
    target = entry / "model.safetensors"
    target.write_bytes(target.read_bytes()[:1000])  # truncated
    capsys.readouterr()
    np.testing.assert_array_equal(embeddings(folder), want)
    assert f"the cached conversion {entry} is damaged" in capsys.readouterr().err
    other = load_file(str(tiny_mlm_dir / "model.safetensors"))
    save_file(other, str(target), metadata={"format": "pt"})  # a whole file, but not this model's
    np.testing.assert_array_equal(embeddings(folder), want)
    assert "is damaged (model.safetensors has" in capsys.readouterr().err  # another size: caught by the size
    shifted = {k: v + 1e-3 for k, v in load_file(str(tiny_model_dir / "model.safetensors")).items()}
    save_file(shifted, str(target), metadata={"format": "pt"})  # the same size, other numbers: by the sha256
    np.testing.assert_array_equal(embeddings(folder), want)
    assert "does not match the sha256" in capsys.readouterr().err
    (entry / "entry.json").unlink()  # an entry written before entries were verified
    np.testing.assert_array_equal(embeddings(folder), want)
    assert "converting again" in capsys.readouterr().err
    np.testing.assert_array_equal(embeddings(folder), want)
    assert "converting" not in capsys.readouterr().err  # a sound entry is read as it is


def test_a_killed_conversion_leaves_no_temp_files_behind(tiny_model_dir, tmp_path, cache):
    """What `kill -9` during a conversion leaves (a temp folder of a dead process; a temp file of an older
    bertino, a day old) is deleted by the next load; a live conversion's temp folder is not touched."""
    folder = pickle_only(tiny_model_dir, tmp_path / "m")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    killed = cache / f".tmp-{'a' * 64}.{host}.{dead.pid}"
    live = cache / f".tmp-{'b' * 64}.{host}.{os.getpid()}"
    old_style = cache / ("c" * 64) / ".tmp-model.safetensors.x1y2z3"
    for path in (killed / "model.safetensors", live / "model.safetensors", old_style):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\0" * 1000)
    day_ago = time.time() - 2 * 24 * 3600
    os.utime(old_style, (day_ago, day_ago))
    embeddings(folder)
    assert not killed.exists() and not old_style.exists() and live.exists()
    assert [p.name for p in entries(cache) if (p / "model.safetensors").is_file()] != []


def test_a_dangling_model_safetensors_link_says_so(tiny_model_dir, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").symlink_to(tmp_path / "blobs" / "deleted")
    with pytest.raises(CheckpointError, match=r"model.safetensors is a symbolic link to .*deleted, which does not "
                                              r"exist"):
        SentenceEncoder.from_pretrained(folder)
