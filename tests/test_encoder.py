"""The hand-written encoder against transformers (the parity oracle), and SentenceEncoder's API contract."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import SENTENCES, make_distilbert
from transformers import AutoTokenizer, BertModel, DistilBertModel

from bertino import CheckpointError, SentenceEncoder
from bertino.batching import PackedTokenIds, length_sorted_batches
from bertino.errors import BertinoError


def pad_batch(token_ids, rows, pad_id) -> dict[str, torch.Tensor]:
    """A naive reference padder (what grad_cache.pad_batch was): rows of `token_ids`, padded to their longest."""
    L = max(len(token_ids[r]) for r in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)  # (B, L)
    mask = torch.zeros((len(rows), L), dtype=torch.long)  # (B, L)
    for i, r in enumerate(rows):
        ids[i, : len(token_ids[r])] = torch.as_tensor(token_ids[r])
        mask[i, : len(token_ids[r])] = 1
    return {"input_ids": ids, "attention_mask": mask}


def reference_mean_pooled(model, folder, texts) -> torch.Tensor:
    """transformers' model + mean pooling over the attention mask, on one padded batch."""
    tok = AutoTokenizer.from_pretrained(str(folder))
    batch = tok(texts, padding=True, return_tensors="pt", return_token_type_ids=False)
    with torch.no_grad():
        hidden = model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).float()
    return (hidden * m).sum(1) / m.sum(1)


def ours_padded(enc: SentenceEncoder, texts) -> torch.Tensor:
    """Our forward on the same single padded batch (no sorting): the padding itself is under test."""
    with torch.no_grad():
        return enc.eval()(enc.tokenize(texts))


def test_distilbert_parity(tiny_model_dir):
    ref = reference_mean_pooled(DistilBertModel.from_pretrained(str(tiny_model_dir)), tiny_model_dir, SENTENCES)
    enc = SentenceEncoder.from_pretrained(tiny_model_dir)
    err_padded = (ours_padded(enc, SENTENCES) - ref).abs().max().item()
    err_encode = (torch.from_numpy(enc.encode(SENTENCES, batch_size=4)) - ref).abs().max().item()
    print(f"DistilBertModel parity: padded {err_padded:.2e}, encode {err_encode:.2e}")
    assert err_padded <= 1e-5 and err_encode <= 1e-5


def test_distilbert_mlm_checkpoint_parity(tiny_mlm_dir):
    # DistilBertForMaskedLM → its `distilbert` submodule is the reference; heads must be dropped on load.
    ref = reference_mean_pooled(DistilBertModel.from_pretrained(str(tiny_mlm_dir)), tiny_mlm_dir, SENTENCES)
    enc = SentenceEncoder.from_pretrained(tiny_mlm_dir)
    err = (ours_padded(enc, SENTENCES) - ref).abs().max().item()
    print(f"DistilBertForMaskedLM parity: {err:.2e}")
    assert err <= 1e-5


def test_bert_checkpoint_converts_exactly(tiny_bert_dir):
    ref = reference_mean_pooled(BertModel.from_pretrained(str(tiny_bert_dir), add_pooling_layer=False),
                                tiny_bert_dir, SENTENCES)
    enc = SentenceEncoder.from_pretrained(tiny_bert_dir)
    err = (ours_padded(enc, SENTENCES) - ref).abs().max().item()
    print(f"BERT → DistilBERT parity: {err:.2e}")
    assert err <= 1e-5


def test_encode_restores_input_order_and_batching_does_not_matter(tiny_model_dir):
    enc = SentenceEncoder.from_pretrained(tiny_model_dir)
    one_by_one = np.stack([enc.encode([t])[0] for t in SENTENCES])
    batched = enc.encode(SENTENCES, batch_size=4)
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)
    assert batched.dtype == np.float32 and batched.shape == (len(SENTENCES), enc.dim)
    assert enc.encode(SENTENCES[0]).shape == (enc.dim,)


@pytest.mark.parametrize("seed", range(5))
def test_encode_batches_cover_every_text_once_within_the_memory_of_fixed_batches(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.choice([3, 4, 5, 9, 30, 31], size=int(rng.integers(1, 300)))  # many equal lengths, like queries
    batch_size = int(rng.integers(1, 20))
    batches = length_sorted_batches(lengths, batch_size, grow=True)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    budget = batch_size * lengths.max()
    done = 0
    for b in batches:
        L0 = lengths[b].max()
        assert len(b) * L0 <= max(budget, L0)  # never more tokens than batch_size texts of the longest length
        assert len(b) >= min(batch_size, len(lengths) - done)  # at least a full batch unless the texts run out
        assert (lengths[b[batch_size:]] == L0).all()  # texts past batch_size add no padding
        assert list(lengths[b]) == sorted(lengths[b], reverse=True)
        done += len(b)
    starts = [lengths[b[0]] for b in batches]
    assert starts == sorted(starts, reverse=True)  # longest first: peak memory shows at once


def test_packed_token_ids_pad_like_pad_batch(tiny_model_dir):
    enc = SentenceEncoder.from_pretrained(tiny_model_dir)
    texts = SENTENCES * 3
    packed = PackedTokenIds.tokenize(enc, texts, chunk=4)  # several tokenizer chunks
    lists = enc.token_ids(texts)
    assert packed.lengths.tolist() == [len(t) for t in lists]
    from_lists = PackedTokenIds.from_lists(lists)
    assert from_lists.lengths.tolist() == packed.lengths.tolist()
    for rows in ([0], [5, 1, 2], list(range(len(texts)))[::-1]):
        ref = pad_batch(lists, rows, 0)
        for ours in (packed.pad(rows, 0), from_lists.pad(rows, 0)):
            assert set(ours) == set(ref)
            for k in ref:
                assert ours[k].dtype == ref[k].dtype and torch.equal(ours[k], ref[k]), k
    for ours in (packed.pad([2, 3], 7), from_lists.pad([2, 3], 7)):  # a pad id other than 0 fills the tail
        assert torch.equal(ours["input_ids"], pad_batch(lists, [2, 3], 7)["input_ids"])
        assert (ours["input_ids"][ours["attention_mask"] == 0] == 7).all() and (ours["attention_mask"] == 0).any()


def test_tokenize_pads_like_the_tokenizer(tiny_model_dir):
    enc = SentenceEncoder.from_pretrained(tiny_model_dir, max_seq_length=12)  # some texts are cut at 12 tokens
    texts = SENTENCES + ["x " * 40]
    ref = enc.tokenizer(texts, padding=True, truncation=True, max_length=12, return_tensors="pt",
                        return_token_type_ids=False)
    ours = enc.tokenize(texts)
    assert set(ours) == {"input_ids", "attention_mask"}
    assert ours["input_ids"].shape[1] == 12
    for k in ours:
        assert ours[k].dtype == torch.long and torch.equal(ours[k], ref[k]), k


def test_truncate_dim_is_a_prefix_and_normalize(tiny_model_dir):
    enc = SentenceEncoder.from_pretrained(tiny_model_dir)
    full = enc.encode(SENTENCES)
    np.testing.assert_array_equal(enc.encode(SENTENCES, truncate_dim=8), full[:, :8])
    unit = enc.encode(SENTENCES, truncate_dim=8, normalize=True)
    np.testing.assert_allclose(unit, full[:, :8] / np.linalg.norm(full[:, :8], axis=1, keepdims=True), atol=1e-6)


def test_encode_keeps_training_mode_and_needs_no_grad(tiny_model_dir):
    enc = SentenceEncoder.from_pretrained(tiny_model_dir).train()
    a, b = enc.encode(SENTENCES), enc.encode(SENTENCES)
    np.testing.assert_array_equal(a, b)  # eval mode inside encode: dropout off
    assert enc.training


def test_bad_input_errors(tiny_model_dir, tmp_path):
    enc = SentenceEncoder.from_pretrained(tiny_model_dir)
    assert enc.encode([]).shape == (0, enc.dim)
    assert enc.encode([], truncate_dim=4).shape == (0, 4)
    with pytest.raises(BertinoError, match="truncate_dim=64 is not in 1..32"):
        enc.encode(SENTENCES, truncate_dim=64)
    with pytest.raises(BertinoError, match=r"texts\[1\] is int"):
        enc.encode(["ok", 3])
    with pytest.raises(BertinoError, match="list of strings"):
        enc.encode(None)
    with pytest.raises(CheckpointError, match="not a model folder"):
        SentenceEncoder.from_pretrained(tmp_path)


def test_unknown_layout_and_shape_mismatch(tiny_model_dir, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_model_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="model_type 'gpt2' is not supported"):
        SentenceEncoder.from_pretrained(bad)
    (bad / "config.json").write_text(json.dumps({**cfg, "hidden_dim": 100}))
    with pytest.raises(CheckpointError, match=r"shape mismatch for 'transformer.layer.0.ffn.lin1.weight'"):
        SentenceEncoder.from_pretrained(bad)
    (bad / "config.json").write_text(json.dumps({**cfg, "n_layers": 3}))
    with pytest.raises(CheckpointError, match=r"missing keys \['transformer.layer.2"):
        SentenceEncoder.from_pretrained(bad)
    (bad / "config.json").write_text(json.dumps({**cfg, "n_layers": 1}))
    with pytest.raises(CheckpointError, match=r"unexpected keys \['transformer.layer.1"):
        SentenceEncoder.from_pretrained(bad)
    (bad / "config.json").write_text(json.dumps({**cfg, "vocab_size": 10}))
    with pytest.raises(CheckpointError, match="shape mismatch for 'embeddings.word_embeddings.weight'"):
        SentenceEncoder.from_pretrained(bad)


def test_tokenizer_that_does_not_fit_the_weights_is_an_error(tmp_path):
    folder = make_distilbert(tmp_path / "m")
    vocab = (folder / "vocab.txt").read_text().splitlines()
    (folder / "vocab.txt").write_text("\n".join(vocab + [f"extra{i}" for i in range(50)]) + "\n")
    for f in ("tokenizer.json",):
        (folder / f).unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match=r"tokenizer has 195 tokens \(largest id 194\) but the embedding matrix has 145 rows"):
        SentenceEncoder.from_pretrained(folder)


def test_save_pretrained_round_trip_and_layout(tiny_bert_dir, tmp_path):
    enc = SentenceEncoder.from_pretrained(tiny_bert_dir)
    out = tmp_path / "saved"
    enc.save_pretrained(out, matryoshka_dims=[32, 16], model_card="# card\n")
    again = SentenceEncoder.from_pretrained(out)
    np.testing.assert_array_equal(enc.encode(SENTENCES), again.encode(SENTENCES))

    modules = json.loads((out / "modules.json").read_text())
    assert modules == [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    pooling = json.loads((out / "1_Pooling" / "config.json").read_text())
    assert pooling["word_embedding_dimension"] == 32 and pooling["pooling_mode_mean_tokens"] is True
    assert not any(v for k, v in pooling.items() if k.startswith("pooling_mode") and k != "pooling_mode_mean_tokens")
    assert json.loads((out / "sentence_bert_config.json").read_text()) == {"max_seq_length": 64,
                                                                           "do_lower_case": False}
    st = json.loads((out / "config_sentence_transformers.json").read_text())
    assert st["similarity_fn_name"] == "cosine" and st["bertino"]["matryoshka_dims"] == [32, 16]
    hf = json.loads((out / "config.json").read_text())
    assert hf["model_type"] == "distilbert" and hf["dim"] == 32
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = set(f.keys())
    assert "embeddings.word_embeddings.weight" in keys and not any(k.startswith("distilbert.") for k in keys)
    assert (out / "README.md").read_text() == "# card\n"
    # transformers reads the saved folder as a plain DistilBertModel with identical outputs
    ref = reference_mean_pooled(DistilBertModel.from_pretrained(str(out)), out, SENTENCES)
    assert (ours_padded(again, SENTENCES) - ref).abs().max().item() <= 1e-5


def test_sentence_transformers_folder_with_normalize(tiny_model_dir, tmp_path):
    enc = SentenceEncoder.from_pretrained(tiny_model_dir)
    enc.normalize_output = True
    enc.save_pretrained(tmp_path / "st")
    again = SentenceEncoder.from_pretrained(tmp_path / "st")
    assert again.normalize_output
    e = again.encode(SENTENCES)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-6)
