"""Pooling (mean, CLS, max) and the sentence-transformers folders that ask for it, in both generations:
5.x's module paths and `pooling_mode_*` booleans, 6.x's new paths and `"pooling_mode": "cls"`. The oracle is the
pooling computed by hand, token by token, on transformers' own token embeddings; and each mode trains (GradCache
gives the full batch's gradient, a run keeps the mode in the folders it saves)."""

from __future__ import annotations

import functools
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SENTENCES
from helpers import (CASES, ROOT, full_batch_plain, grad_cache_grads, max_rel_error, read_metrics, train_config,
                     write_config)
from transformers import AutoTokenizer, DistilBertModel

from bertino import CheckpointError, SentenceEncoder

OLD = {"Transformer": "sentence_transformers.models.Transformer", "Pooling": "sentence_transformers.models.Pooling",
       "Normalize": "sentence_transformers.models.Normalize"}
NEW = {"Transformer": "sentence_transformers.base.modules.transformer.Transformer",  # sentence-transformers 6.x
       "Pooling": "sentence_transformers.sentence_transformer.modules.pooling.Pooling",
       "Normalize": "sentence_transformers.base.modules.normalize.Normalize"}
BOOLEANS = ["pooling_mode_cls_token", "pooling_mode_mean_tokens", "pooling_mode_max_tokens",
            "pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken"]


def st_folder(model_dir: Path, out: Path, types: dict, pooling: dict, normalize: bool = False) -> Path:
    """A sentence-transformers folder around `model_dir`'s transformer, as sentence-transformers writes it."""
    shutil.copytree(model_dir, out)
    modules = [{"idx": 0, "name": "0", "path": "", "type": types["Transformer"]},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": types["Pooling"]}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": types["Normalize"]})
        (out / "2_Normalize").mkdir()
    (out / "modules.json").write_text(json.dumps(modules))
    if types is NEW:  # 6.x: no max_seq_length here (it lives in the tokenizer's config)
        st = {"transformer_task": "feature-extraction", "module_output_name": "token_embeddings",
              "modality_config": {"text": {"method": "forward", "method_output_name": "last_hidden_state"}}}
    else:
        st = {"max_seq_length": 64, "do_lower_case": False}
    (out / "sentence_bert_config.json").write_text(json.dumps(st))
    (out / "1_Pooling").mkdir()
    (out / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    return out


def old_pooling(mode_key: str) -> dict:
    return {"word_embedding_dimension": 32, **{k: k == mode_key for k in BOOLEANS}, "include_prompt": True}


def new_pooling(mode) -> dict:
    return {"embedding_dimension": 32, "pooling_mode": mode, "include_prompt": True}


@functools.lru_cache(maxsize=None)
def token_embeddings(model_dir: Path, texts: tuple[str, ...]) -> list[np.ndarray]:
    """transformers' token embeddings of each text alone (no padding: every token is real), (L, D) each."""
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = DistilBertModel.from_pretrained(str(model_dir)).eval()
    with torch.no_grad():
        return [model(**tok(t, return_tensors="pt", return_token_type_ids=False)).last_hidden_state[0].double().numpy()
                for t in texts]


def by_hand(model_dir: Path, texts: list[str], mode: str, normalize: bool = False) -> np.ndarray:
    """transformers' token embeddings of each text, pooled with plain loops."""
    out = []
    for tokens in token_embeddings(model_dir, tuple(texts)):
        if mode == "cls":
            e = tokens[0]
        elif mode == "max":
            e = np.array([max(tokens[t, j] for t in range(len(tokens))) for j in range(tokens.shape[1])])
        else:
            e = sum(tokens[t] for t in range(len(tokens))) / len(tokens)
        out.append(e / np.linalg.norm(e) if normalize else e)
    return np.stack(out)


CASES_ST = [("5.x booleans", OLD, old_pooling("pooling_mode_cls_token"), "cls"),
            ("5.x booleans", OLD, old_pooling("pooling_mode_max_tokens"), "max"),
            ("5.x booleans", OLD, old_pooling("pooling_mode_mean_tokens"), "mean"),
            ("6.x pooling_mode", NEW, new_pooling("cls"), "cls"),
            ("6.x pooling_mode", NEW, new_pooling("max"), "max"),
            ("6.x pooling_mode", NEW, new_pooling(["mean"]), "mean")]


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("label, types, pooling, mode", CASES_ST, ids=[f"{c[0]}-{c[3]}" for c in CASES_ST])
def test_both_generations_load_with_their_pooling(tiny_model_dir, tmp_path, label, types, pooling, mode, normalize):
    folder = st_folder(tiny_model_dir, tmp_path / "st", types, pooling, normalize)
    enc = SentenceEncoder.from_pretrained(folder)
    assert (enc.pooling, enc.normalize_output) == (mode, normalize)
    got = enc.encode(SENTENCES, batch_size=4)  # batched and padded: the padding must not change a vector
    want = by_hand(tiny_model_dir, SENTENCES, mode, normalize)
    err = np.abs(got - want).max()
    print(f"{label}, {mode} pooling{' + Normalize' if normalize else ''}: max abs diff to the hand pooling {err:.2e}")
    assert err <= 1e-5


def test_the_three_poolings_really_differ(tiny_model_dir):
    pooled = [by_hand(tiny_model_dir, SENTENCES, mode) for mode in ("cls", "max", "mean")]
    assert min(np.abs(a - b).max() for i, a in enumerate(pooled) for b in pooled[i + 1:]) > 1e-2


@pytest.mark.parametrize("pooling, named", [(new_pooling("lasttoken"), "lasttoken"),
                                            (new_pooling(["cls", "mean"]), "cls + mean"),
                                            (old_pooling("pooling_mode_weightedmean_tokens"), "weightedmean"),
                                            ({"word_embedding_dimension": 32}, "none")])
def test_an_unsupported_pooling_is_named(tiny_model_dir, tmp_path, pooling, named):
    folder = st_folder(tiny_model_dir, tmp_path / "st", NEW, pooling)
    with pytest.raises(CheckpointError, match=re.escape(f"1_Pooling/config.json: pooling {named} is not supported "
                                                        f"(bertino pools with exactly one of mean, cls, max)")):
        SentenceEncoder.from_pretrained(folder)


def test_other_modules_and_tasks_are_named(tiny_model_dir, tmp_path):
    folder = st_folder(tiny_model_dir, tmp_path / "st", NEW, new_pooling("cls"))
    modules = json.loads((folder / "modules.json").read_text())
    dense = {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.base.modules.dense.Dense"}
    (folder / "modules.json").write_text(json.dumps(modules + [dense]))
    with pytest.raises(CheckpointError, match=r"module type 'sentence_transformers.base.modules.dense.Dense' is not "
                                              r"supported"):
        SentenceEncoder.from_pretrained(folder)
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"transformer_task": "fill-mask"}))
    with pytest.raises(CheckpointError, match="transformer_task 'fill-mask' is not supported"):
        SentenceEncoder.from_pretrained(folder)


@pytest.mark.parametrize("mode", ["cls", "max"])
def test_save_pretrained_writes_the_widely_loadable_layout(tiny_model_dir, tmp_path, mode):
    """A 6.x folder saved again: 5.x module paths and booleans (what every sentence-transformers version reads),
    the same pooling, the same embeddings."""
    enc = SentenceEncoder.from_pretrained(st_folder(tiny_model_dir, tmp_path / "st", NEW, new_pooling(mode), True))
    enc.save_pretrained(tmp_path / "saved")
    modules = json.loads((tmp_path / "saved" / "modules.json").read_text())
    assert [m["type"] for m in modules] == [OLD["Transformer"], OLD["Pooling"], OLD["Normalize"]]
    pooling = json.loads((tmp_path / "saved" / "1_Pooling" / "config.json").read_text())
    assert {k for k, v in pooling.items() if k.startswith("pooling_mode") and v} == \
        {"pooling_mode_cls_token" if mode == "cls" else "pooling_mode_max_tokens"}
    np.testing.assert_array_equal(SentenceEncoder.from_pretrained(tmp_path / "saved").encode(SENTENCES),
                                  enc.encode(SENTENCES))


@pytest.mark.parametrize("mode", ["cls", "max"])
@pytest.mark.parametrize("case", CASES)
def test_grad_cache_equals_the_full_batch_with_every_pooling(nodrop_model_dir, mode, case):
    """Pooling happens after the encoder's hidden states and never looks at padding: GradCache's chunks give the
    full batch's gradient whatever the mode (float64, dropout off)."""
    enc = SentenceEncoder.from_pretrained(nodrop_model_dir).double().train()
    enc.pooling = mode
    texts, loss_fn = CASES[case]()
    want = full_batch_plain(enc, texts, loss_fn)
    assert max_rel_error(grad_cache_grads(enc, texts, loss_fn), want) <= 1e-10


def test_a_cls_model_trains_and_saves_cls(tiny_model_dir, tmp_path):
    """train.py from a 6.x CLS folder: it trains (finite losses, the weights move), and final/ keeps CLS."""
    sys.path.insert(0, str(ROOT))
    import train

    start = st_folder(tiny_model_dir, tmp_path / "cls-model", NEW, new_pooling("cls"))
    cfg = train_config(tmp_path, start, max_steps=6)
    train.main(["--config", str(write_config(tmp_path, cfg))])
    final = tmp_path / "run" / "final"
    assert SentenceEncoder.from_pretrained(final).pooling == "cls"
    assert json.loads((final / "1_Pooling" / "config.json").read_text())["pooling_mode_cls_token"] is True
    losses = [r["loss/retrieval"] for r in read_metrics(tmp_path / "run") if "lr" in r]
    assert len(losses) == 6 and all(np.isfinite(losses))
    assert not np.allclose(SentenceEncoder.from_pretrained(final).encode(SENTENCES),
                           SentenceEncoder.from_pretrained(start).encode(SENTENCES), atol=1e-3)
