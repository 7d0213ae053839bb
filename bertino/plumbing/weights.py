"""Model weights: read them from a folder (safetensors only), map other layouts' key names to DistilBERT's, load.

Layouts that load (all end as `DistilBertModel` keys, no prefix):
- `DistilBertModel` folders: the keys as they are.
- `DistilBertForMaskedLM` checkpoints: strip `distilbert.`, drop the `vocab_*` heads.
- BERT checkpoints (`BertModel`, `BertForMaskedLM`, ...): renamed key by key. BERT adds a token-type embedding
  to every token; with single-segment input that is always row 0, a constant vector, so adding it into every
  position embedding gives exactly the same function without token types. The pooler is dropped.
- Old files: `LayerNorm.gamma/beta` become `weight/bias`; `embeddings.position_ids` is a buffer, ignored.

Safe loading: weights are read ONLY from safetensors (a flat table of tensors: nothing in it can run). A folder
with only a pickled `pytorch_model.bin` (indigo-ai/BERTino ships one) is read once with
`torch.load(weights_only=True)`, which refuses pickled code, into a safetensors copy in bertino's cache, keyed by the
pickle's sha256 (pickled_weights.py says where and why); later loads read that copy.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..errors import CheckpointError
from .model_folder import missing_file, shard_files
from .pickled_weights import load_pickled_weights, pickle_files

# Keys that belong to heads or buffers we do not need, in any layout.
_DROP = re.compile(
    r"^(vocab_transform|vocab_layer_norm|vocab_projector|pooler|cls|qa_outputs|classifier|pre_classifier)\."
    r"|(^|\.)position_ids$"
)

# BERT → DistilBERT, per layer (applied after `encoder.layer.` → `transformer.layer.`).
_BERT_RENAMES = [
    ("attention.self.query.", "attention.q_lin."),
    ("attention.self.key.", "attention.k_lin."),
    ("attention.self.value.", "attention.v_lin."),
    ("attention.output.dense.", "attention.out_lin."),
    ("attention.output.LayerNorm.", "sa_layer_norm."),
    ("intermediate.dense.", "ffn.lin1."),
    ("output.dense.", "ffn.lin2."),
    ("output.LayerNorm.", "output_layer_norm."),
]


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a model folder: `model.safetensors` or sharded safetensors (never a pickle, see above)."""
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if single.exists():
        return _load_safetensors(single)
    if single.is_symlink():  # a link whose target is gone: say so, not "no model.safetensors"
        raise CheckpointError(f"cannot load the weights: {missing_file(single)}")
    if index.exists():
        state: dict[str, torch.Tensor] = {}
        for shard in shard_files(index):
            state.update(_load_safetensors(folder / shard))
        return state
    if pickle_files(folder):  # pickled weights only: their safe safetensors copy in bertino's cache
        return load_pickled_weights(folder)
    for name in ("model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"):
        if (folder / name).is_symlink():  # dangling (it would have loaded above)
            raise CheckpointError(f"cannot load the weights: {missing_file(folder / name)}")
    found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise CheckpointError(f"{folder}: no model.safetensors in the folder; found {found}")


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as e:  # SafetensorError (truncated / not safetensors), OSError: the file is unusable
        raise CheckpointError(f"{path}: cannot read as safetensors: {type(e).__name__}: {e}") from None


def to_distilbert_keys(state: dict[str, torch.Tensor], model_type: str, source: str) -> dict[str, torch.Tensor]:
    """Convert a checkpoint's tensors to `DistilBertModel` key names (see the module docstring)."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        key = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", key))
        for prefix in ("distilbert.", "bert.", "model."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
        if _DROP.search(key):
            continue
        out[key] = tensor
    if model_type == "distilbert":
        return out
    if model_type != "bert":
        raise CheckpointError(
            f"{source}: model_type {model_type!r} is not supported (expected 'distilbert' or 'bert')"
        )
    bert: dict[str, torch.Tensor] = {}
    for key, tensor in out.items():
        if key.startswith("encoder.layer."):
            key = "transformer.layer." + key[len("encoder.layer.") :]
            for old, new in _BERT_RENAMES:
                if old in key:
                    key = key.replace(old, new, 1)
                    break
        bert[key] = tensor
    token_types = bert.pop("embeddings.token_type_embeddings.weight", None)
    if token_types is not None:
        # Single-segment input always looks up token type 0: fold that constant row into every position.
        bert["embeddings.position_embeddings.weight"] = (
            bert["embeddings.position_embeddings.weight"] + token_types[0]
        )
    return bert


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy `state` into `model` key by key; any missing key, unexpected key or shape mismatch is an error."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        raise CheckpointError(f"{source}: the weights do not fit a DistilBERT encoder: " + "; ".join(parts))
    for key, target in expected.items():
        if tuple(state[key].shape) != tuple(target.shape):
            raise CheckpointError(
                f"{source}: shape mismatch for {key!r}: the checkpoint has {tuple(state[key].shape)}, "
                f"config.json implies {tuple(target.shape)}"
            )
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(state[key])
