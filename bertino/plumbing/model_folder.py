"""Model folders: the files transformers and sentence-transformers keep a sentence encoder in, read and written.

    config.json, model.safetensors, tokenizer files      the transformer (transformers' layout)
    modules.json                                          [Transformer, Pooling(, Normalize)] (sentence-transformers)
    sentence_bert_config.json                             max_seq_length, do_lower_case
    config_sentence_transformers.json                     similarity function; bertino.matryoshka_dims
    1_Pooling/config.json                                 which pooling (exactly one of cls, mean, max)
    2_Normalize/                                          present when the embeddings are normalised
    README.md                                             the model card (model_card.py)

A folder without modules.json is a plain transformers checkpoint: mean pooling, the tokenizer's own length limit.

Both generations of sentence-transformers folders load. Up to 5.x, modules.json names the module types
`sentence_transformers.models.Transformer` / `.Pooling` / `.Normalize` and the pooling config holds one boolean per
mode (`pooling_mode_cls_token`, `pooling_mode_mean_tokens`, `pooling_mode_max_tokens`, ...); 6.x names them where
they live now (`sentence_transformers.base.modules.transformer.Transformer`,
`sentence_transformers.sentence_transformer.modules.pooling.Pooling`, `sentence_transformers.base.modules.normalize
.Normalize`) and writes `"pooling_mode": "cls"` (a name, or a list of names). A type is recognised by its class name
under `sentence_transformers.`, wherever the module sits. bertino writes the older layout, which every
sentence-transformers version loads.
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
# every mode sentence-transformers has, by its boolean key (for the names in messages)
_ST_POOLING_KEYS = {**{key: mode for mode, key in _POOLING_KEYS.items()},
                    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                    "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}
MODULE_CLASSES = ("Transformer", "Pooling", "Normalize")


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
    modules = read_json(modules_file)
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise CheckpointError(f"{modules_file}: expected a list of module objects")
    for m in modules:
        kind = str(m.get("type", ""))
        name = module_class(kind)
        if name == "Transformer":
            folder = root / m.get("path", "")
        elif name == "Pooling":
            pooling = _read_pooling(root / m.get("path", "") / "config.json")
        elif name == "Normalize":
            normalize = True
        else:
            raise CheckpointError(f"{modules_file}: module type {kind!r} is not supported (bertino loads "
                                  f"sentence-transformers' Transformer, Pooling and Normalize modules, at their "
                                  f"5.x or 6.x paths)")
    if folder is None:
        raise CheckpointError(f"{modules_file}: no sentence-transformers Transformer module")
    st_config = folder / "sentence_bert_config.json"
    st = read_json(st_config) if st_config.exists() else {}
    if not isinstance(st, dict):
        raise CheckpointError(f"{st_config}: expected a JSON object, found {type(st).__name__}")
    task = st.get("transformer_task", "feature-extraction")
    if task != "feature-extraction":  # 6.x: e.g. "fill-mask" is a sparse (SPLADE) encoder, not a dense one
        raise CheckpointError(f"{st_config}: transformer_task {task!r} is not supported (bertino encodes with "
                              f"the \"feature-extraction\" task: token embeddings, then pooling)")
    return Layout(folder, pooling, normalize, st.get("max_seq_length"), bool(st.get("do_lower_case", False)))


def module_class(kind: str) -> str | None:
    """"Transformer", "Pooling" or "Normalize" for a sentence-transformers module type at any of its paths
    (`sentence_transformers.models.Pooling`, `sentence_transformers.sentence_transformer.modules.pooling.Pooling`),
    else None."""
    name = kind.rsplit(".", 1)[-1]
    return name if kind.startswith("sentence_transformers.") and name in MODULE_CLASSES else None


def _read_pooling(path: Path) -> str:
    """The one pooling mode of a Pooling module's config: 6.x's `pooling_mode` (a name or a list of names), or
    the booleans `pooling_mode_*_tokens` of earlier versions."""
    config = read_json(path)
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    if "pooling_mode" in config:
        given = config["pooling_mode"]
        modes = list(given) if isinstance(given, list) else [given]
    else:
        modes = [_ST_POOLING_KEYS.get(k, k.removeprefix("pooling_mode_")) for k, v in config.items()
                 if k.startswith("pooling_mode_") and v is True]
    if len(modes) != 1 or modes[0] not in POOLING_MODES:
        found = " + ".join(map(str, modes)) if modes else "none"
        raise CheckpointError(f"{path}: pooling {found} is not supported (bertino pools with exactly one of "
                              f"{', '.join(POOLING_MODES)})")
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
