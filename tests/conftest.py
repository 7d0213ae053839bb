"""Shared fixtures: tiny random checkpoints (DistilBERT, DistilBERT-MLM, BERT) with a real WordPiece tokenizer.

Everything is built offline with transformers' own classes and `save_pretrained`, so the folders have exactly
the layout of hub checkpoints.
"""

from __future__ import annotations

import string
from pathlib import Path

import pytest
import torch

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["il", "la", "di", "che", "chi", "ha", "un", "una", "del", "della", "gatto", "cane", "casa", "libro",
         "tabella", "inserire", "testo", "pagina", "documento", "modifica", "formato", "cella", "leonardo",
         "gioconda", "dipinto", "louvre", "roma", "milano", "città", "acqua", "sole", "mare", "the", "cat"]


def write_vocab(folder: Path) -> Path:
    chars = list(string.ascii_lowercase + string.digits + "àèéìòù.,;:!?'\"()-")
    vocab = SPECIALS + WORDS + chars + ["##" + c for c in chars]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n", encoding="utf-8")
    return folder / "vocab.txt"


def save_tokenizer(folder: Path, model_max_length: int = 64) -> int:
    from transformers import BertTokenizerFast

    vocab = write_vocab(folder)
    tok = BertTokenizerFast(vocab=str(vocab), do_lower_case=True, model_max_length=model_max_length)
    tok.save_pretrained(str(folder))
    return len(tok)


def make_distilbert(folder: Path, *, seed: int = 0, mlm: bool = False, dropout: float = 0.1, dim: int = 32,
                    n_layers: int = 2) -> Path:
    from transformers import DistilBertConfig, DistilBertForMaskedLM, DistilBertModel

    vocab_size = save_tokenizer(folder)
    cfg = DistilBertConfig(vocab_size=vocab_size, dim=dim, n_layers=n_layers, n_heads=4, hidden_dim=4 * dim,
                           max_position_embeddings=64, dropout=dropout, attention_dropout=dropout)
    torch.manual_seed(seed)
    model = (DistilBertForMaskedLM if mlm else DistilBertModel)(cfg)
    _randomize_layernorms(model)
    model.save_pretrained(str(folder))
    return folder


def make_bert(folder: Path, *, seed: int = 0, dim: int = 32) -> Path:
    from transformers import BertConfig, BertModel

    vocab_size = save_tokenizer(folder)
    cfg = BertConfig(vocab_size=vocab_size, hidden_size=dim, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=4 * dim, max_position_embeddings=64, layer_norm_eps=1e-12)
    torch.manual_seed(seed)
    model = BertModel(cfg)
    _randomize_layernorms(model)
    with torch.no_grad():  # a visible token-type row 0, so the conversion's fold-in is really tested
        model.embeddings.token_type_embeddings.weight.normal_(0, 0.5)
    model.save_pretrained(str(folder))
    return folder


def _randomize_layernorms(model: torch.nn.Module) -> None:
    # Fresh LayerNorms are the identity (1, 0): randomise them so a swapped weight/bias would show in parity tests.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random 2-layer, 32-dim DistilBertModel folder with a WordPiece tokenizer (dropout 0.1)."""
    return make_distilbert(tmp_path_factory.mktemp("tiny_distilbert"))


@pytest.fixture(scope="session")
def nodrop_model_dir(tmp_path_factory) -> Path:
    """The same architecture without dropout (p = 0): GradCache equals one full batch bit for bit in float64, and
    2 processes equal 1, without keyed masks."""
    return make_distilbert(tmp_path_factory.mktemp("tiny_nodrop"), dropout=0.0, seed=3)


@pytest.fixture(scope="session")
def dropout_model_dir(tmp_path_factory) -> Path:
    """Heavy dropout (0.3), so a wrong mask or a wrong dropout scale shows in every comparison."""
    return make_distilbert(tmp_path_factory.mktemp("tiny_dropout"), dropout=0.3, seed=11)


@pytest.fixture(scope="session")
def tiny_mlm_dir(tmp_path_factory) -> Path:
    return make_distilbert(tmp_path_factory.mktemp("tiny_distilbert_mlm"), seed=1, mlm=True)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    return make_bert(tmp_path_factory.mktemp("tiny_bert"), seed=2)


SENTENCES = [
    "Chi ha dipinto la Gioconda?",
    "Leonardo da Vinci è l'autore della Gioconda, opera conservata al Louvre.",
    "il gatto",
    "Inserire una tabella nel documento di testo e modificare il formato della cella.",
    "roma",
    "Il cane e il gatto dormono a casa, vicino al mare, sotto il sole di Milano.",
]
