"""Model folders: the files transformers and sentence-transformers keep a sentence encoder in, read and written.

    config.json, model.safetensors, tokenizer files      the transformer (transformers' layout)
    modules.json                                          [Transformer, Pooling(, Normalize)] (sentence-transformers)
    sentence_bert_config.json                             max_seq_length, do_lower_case
    config_sentence_transformers.json                     similarity function; bertino.matryoshka_dims
    1_Pooling/config.json                                 which pooling (exactly one of cls, mean, max)
    2_Normalize/                                          present when the embeddings are normalised
    README.md                                             the model card (model_card.py)

A folder without modules.json is a plain transformers checkpoint: mean pooling, the tokenizer's own length limit.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..errors import CheckpointError
from .files import read_json

POOLING_MODES = ("mean", "cls", "max")
ST_TRANSFORMER = "sentence_transformers.models.Transformer"
ST_POOLING = "sentence_transformers.models.Pooling"
ST_NORMALIZE = "sentence_transformers.models.Normalize"
_POOLING_KEYS = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens", "max": "pooling_mode_max_tokens"}


@dataclass(frozen=True)
class Layout:
    """What a model folder says about the encoder in it."""

    transformer: Path  # the folder with config.json, the weights and the tokenizer files
    pooling: str = "mean"
    normalize: bool = False
    max_seq_length: int | None = None  # None: the tokenizer's own limit
    do_lower_case: bool = False


def read_layout(root: Path) -> Layout:
    """Honour a sentence-transformers `modules.json`; a folder without one is a plain transformers checkpoint."""
    modules_file = root / "modules.json"
    if not modules_file.exists():
        if not (root / "config.json").exists():
            raise CheckpointError(f"{root}: not a model folder (no config.json and no modules.json)")
        return Layout(root)
    folder, pooling, normalize = None, "mean", False
    for m in read_json(modules_file):
        kind = m.get("type", "")
        if kind.endswith("models.Transformer"):
            folder = root / m.get("path", "")
        elif kind.endswith("models.Pooling"):
            pooling = _read_pooling(root / m["path"] / "config.json")
        elif kind.endswith("models.Normalize"):
            normalize = True
        else:
            raise CheckpointError(f"{modules_file}: module type {kind!r} is not supported "
                                  f"(expected Transformer, Pooling, Normalize)")
    if folder is None:
        raise CheckpointError(f"{modules_file}: no sentence_transformers.models.Transformer module")
    st_config = folder / "sentence_bert_config.json"
    st = read_json(st_config) if st_config.exists() else {}
    return Layout(folder, pooling, normalize, st.get("max_seq_length"), bool(st.get("do_lower_case", False)))


def _read_pooling(path: Path) -> str:
    config = read_json(path)
    modes = [mode for mode, key in _POOLING_KEYS.items() if config.get(key)]
    others = [k for k, v in config.items() if k.startswith("pooling_mode") and v and k not in _POOLING_KEYS.values()]
    if len(modes) != 1 or others:
        raise CheckpointError(f"{path}: pooling {modes + others} is not supported (exactly one of cls, mean, max)")
    return modes[0]


def shard_files(index: Path) -> list[str]:
    """The shard file names a sharded checkpoint's index (`model.safetensors.index.json`,
    `pytorch_model.bin.index.json`) maps its tensors to, each checked to be there."""
    data = read_json(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: expected a \"weight_map\" object (tensor name → shard file name), found "
                              f"{'keys ' + str(sorted(data)) if isinstance(data, dict) else type(data).__name__}")
    names = sorted(set(weight_map.values()))
    for name in names:
        if not (index.parent / name).is_file():
            raise CheckpointError(f"{index}: its weight_map names the shard {name}, but "
                                  f"{missing_file(index.parent / name)}")
    return names


def missing_file(path: Path) -> str:
    """Why `path` cannot be read, for a message: no such file, or a link whose target is gone."""
    if path.is_symlink():
        return (f"{path} is a symbolic link to {os.readlink(path)}, which does not exist (a hub cache whose blob "
                f"was deleted? download the model again)")
    return f"{path} does not exist"


def write_sentence_transformers_files(out: Path, *, dim: int, layout: Layout, version: str,
                                      matryoshka_dims: Sequence[int] | None = None,
                                      model_card: str | None = None) -> None:
    """The sentence-transformers files around a transformer already saved in `out` (the folder is its own
    Transformer module: `path` "")."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": ST_TRANSFORMER},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": ST_POOLING}]
    if layout.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": ST_NORMALIZE})
        (out / "2_Normalize").mkdir(exist_ok=True)
    _write(out / "modules.json", modules)
    _write(out / "sentence_bert_config.json",
           {"max_seq_length": layout.max_seq_length, "do_lower_case": layout.do_lower_case})
    st_config = {"__version__": {"bertino": version}, "prompts": {}, "default_prompt_name": None,
                 "similarity_fn_name": "cosine"}
    if matryoshka_dims:
        st_config["bertino"] = {"matryoshka_dims": [int(d) for d in matryoshka_dims]}
    _write(out / "config_sentence_transformers.json", st_config)
    (out / "1_Pooling").mkdir(exist_ok=True)
    _write(out / "1_Pooling" / "config.json", {
        "word_embedding_dimension": dim,
        **{key: layout.pooling == mode for mode, key in _POOLING_KEYS.items()},
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": False,
        "include_prompt": True,
    })
    if model_card is not None:
        (out / "README.md").write_text(model_card, encoding="utf-8")


def _write(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
