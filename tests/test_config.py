"""Config loading: overrides, type errors that list what is valid, semantic checks, round trip, the card's numbers."""

import json
from pathlib import Path

import pytest

from bertino.errors import ConfigError
from bertino.losses import DEFAULT_SCALE, LOSSES
from bertino.plumbing.config import (
    Config, MatryoshkaConfig, TaskConfig, apply_overrides, check_against_model, config_from_dict, config_to_dict,
    load_config, save_config,
)
from bertino.plumbing.typed_json import parse_override
from bertino.speedups.settings import SpeedupsConfig

ROOT = Path(__file__).resolve().parents[1]


def scale_of(task: TaskConfig) -> float | None:
    """The similarity scale a task's loss uses: its own, or the loss's default (None: the loss has no scale)."""
    return LOSSES[task.loss].default_scale if task.scale is None else task.scale


def minimal() -> dict:
    return {
        "model": {"name_or_path": "indigo-ai/BERTino"},
        "tasks": {
            "retrieval": {"dataset": "r.jsonl", "columns": ["query", "positive", "negative_1"], "loss": "mnrl"},
            "sts": {"dataset": "s.jsonl", "columns": ["sentence1", "sentence2", "score"], "loss": "cosent",
                    "score_scale": 5.0},
        },
        "matryoshka": {"dims": [768, 128], "weights": [1.0, 0.5]},
    }


def build(*overrides: str, data: dict | None = None) -> Config:
    return config_from_dict(apply_overrides(data or minimal(), overrides))


def error_of(*overrides: str, data: dict | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        build(*overrides, data=data)
    return str(info.value)


# ── overrides ────────────────────────────────────────────────────────────────────────────────────────────────

@pytest.mark.parametrize("text, keys, value", [
    ("train.max_steps=10", ["train", "max_steps"], 10),
    ("train.learning_rate=2e-5", ["train", "learning_rate"], 2e-5),
    ("matryoshka.dims=[384,128]", ["matryoshka", "dims"], [384, 128]),
    ('model.name_or_path="/models/x"', ["model", "name_or_path"], "/models/x"),
    ("model.name_or_path=/models/x", ["model", "name_or_path"], "/models/x"),  # not JSON → plain string
    ("matryoshka=null", ["matryoshka"], None),
    ("train.fp16=true", ["train", "fp16"], True),
    ("tasks.retrieval.dataset=a=b.jsonl", ["tasks", "retrieval", "dataset"], "a=b.jsonl"),  # first '=' splits
    ("train.output_dir=", ["train", "output_dir"], ""),
])
def test_parse_override(text, keys, value):
    assert parse_override(text) == (keys, value)


@pytest.mark.parametrize("text", ["train.max_steps", "=3", "train..x=1", "train.=1"])
def test_malformed_override(text):
    with pytest.raises(ConfigError, match="KEY.SUB=VALUE"):
        parse_override(text)


def test_overrides_apply_to_nested_and_task_keys():
    cfg = build("train.max_steps=10", "model.name_or_path=/models/x", "tasks.retrieval.dataset=other.jsonl",
                "tasks.sts.balance_to=\"retrieval\"", "eval.ir=[\"a.jsonl\",\"b.jsonl\"]", "eval.dims=[768,64]",
                "tasks.retrieval.scale=30")
    assert cfg.train.max_steps == 10
    assert cfg.model.name_or_path == "/models/x"
    assert cfg.tasks["retrieval"].dataset == "other.jsonl"
    assert cfg.tasks["sts"].balance_to == "retrieval"
    assert cfg.eval.ir == ("a.jsonl", "b.jsonl") and cfg.eval.dims == (768, 64)
    assert cfg.tasks["retrieval"].scale == 30.0 and isinstance(cfg.tasks["retrieval"].scale, float)


def test_matryoshka_null_and_back():
    assert build("matryoshka=null").matryoshka is None
    data = minimal()
    data["matryoshka"] = None
    cfg = build("matryoshka.dims=[384,128]", "matryoshka.weights=[1,1]", data=data)  # null object is created
    assert cfg.matryoshka == MatryoshkaConfig(dims=(384, 128), weights=(1.0, 1.0))


def test_override_into_a_scalar_is_an_error():
    assert "train.fp16 is false (boolean), not an object" in error_of("train.fp16.x=1", data={
        **minimal(), "train": {"fp16": False}})


def test_overrides_do_not_mutate_input():
    data = minimal()
    apply_overrides(data, ["train.max_steps=3", "tasks.retrieval.loss=\"cached_mnrl\""])
    assert data == minimal()


def test_new_task_by_override():
    cfg = build('tasks.extra.dataset=x.jsonl', 'tasks.extra.columns=["a","b"]', 'tasks.extra.loss=mnrl')
    assert cfg.tasks["extra"] == TaskConfig(dataset="x.jsonl", columns=("a", "b"), loss="mnrl")


# ── type errors ──────────────────────────────────────────────────────────────────────────────────────────────

def test_unknown_key_lists_valid_keys_and_path():
    msg = error_of("train.learning_rat=1e-5")
    assert msg.startswith("train.learning_rat: unknown key 'learning_rat'")
    for key in ("learning_rate", "per_device_train_batch_size", "resume_from_checkpoint", "ddp_timeout"):
        assert key in msg
    msg = error_of("speedups.memory_budgt=1")
    assert msg.startswith("speedups.memory_budgt: unknown key") and "memory_budget, linear_tape" in msg
    msg = error_of("tasks.sts.datset=x")
    assert "tasks.sts.datset" in msg and "dataset, columns, loss, config, split, scale, score_scale, balance_to" in msg
    msg = error_of("modle.name_or_path=x")
    assert "top level" in msg and "model, tasks, matryoshka, train, eval" in msg


def test_missing_required_key():
    data = minimal()
    del data["tasks"]["sts"]["loss"]
    assert "tasks.sts: missing required key(s) 'loss'" in error_of(data=data)
    assert "missing required key(s) 'model'" in error_of(data={"tasks": minimal()["tasks"]})


@pytest.mark.parametrize("override, fragments", [
    ("train.seed=true", ["train.seed", "expected integer", "true (boolean)"]),             # bool is not an int
    ("train.per_device_train_batch_size=false", ["expected integer", "false (boolean)"]),
    ("train.fp16=1", ["train.fp16", "expected boolean", "1 (number)"]),
    ("train.learning_rate=\"fast\"", ["train.learning_rate", "expected finite number", '"fast" (string)']),
    ("train.learning_rate=true", ["expected finite number", "true (boolean)"]),
    ("train.learning_rate=NaN", ["expected finite number", "NaN"]),
    ("train.num_train_epochs=1.5", ["train.num_train_epochs", "expected integer", "1.5"]),
    ("model.name_or_path=3", ["model.name_or_path", "expected string", "3 (number)"]),
    ("matryoshka.dims=[768,\"a\"]", ["matryoshka.dims[1]", "expected integer", '"a" (string)']),
    ("matryoshka.dims=768", ["matryoshka.dims", "expected list of integer", "768 (number)"]),
    ("matryoshka=5", ["matryoshka", "or null", "5 (number)"]),
    ("tasks=[]", ["tasks", "expected object of", "(list)"]),
    ("tasks.sts.columns=\"sentence1\"", ["tasks.sts.columns", "expected list of string"]),
    ("tasks.sts.config=1", ["tasks.sts.config", "expected string, or null"]),
    ("train.resume_from_checkpoint=3", ["train.resume_from_checkpoint", "string, or boolean", "or null"]),
    ("eval.dims=[768,1.5]", ["eval.dims[1]", "expected integer"]),
])
def test_wrong_type_messages(override, fragments):
    msg = error_of(override)
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)


@pytest.mark.parametrize("override, valid", [
    ("tasks.sts.loss=cosine_similarity", "'mnrl', 'cached_mnrl', 'cosent', 'cosine'"),
    ("train.lr_scheduler_type=step", "'cosine', 'linear', 'constant'"),
    ("train.batch_sampler=random", "'no_duplicates', 'batch_sampler'"),
    ("train.multi_dataset_batch_sampler=mix", "'proportional', 'round_robin'"),
    ('eval.index=["ivf-pq"]', "'flat', 'sq8', 'binary-flat', 'hnsw', 'hnsw-sq8'"),
    ('eval.precision=["int4"]', "'float32', 'int8', 'binary'"),
])
def test_unknown_names_list_the_valid_ones(override, valid):
    msg = error_of(override)
    assert override.split("=")[0] in msg and valid in msg


def test_accepted_types():
    cfg = build("train.learning_rate=1", "train.resume_from_checkpoint=true", "tasks.sts.scale=10")
    assert cfg.train.learning_rate == 1.0 and isinstance(cfg.train.learning_rate, float)
    assert cfg.train.resume_from_checkpoint is True
    assert build("train.resume_from_checkpoint=runs/v5/checkpoint-10").train.resume_from_checkpoint == \
        "runs/v5/checkpoint-10"
    assert isinstance(cfg.tasks["retrieval"].columns, tuple) and isinstance(cfg.matryoshka.weights, tuple)


# ── semantic checks ──────────────────────────────────────────────────────────────────────────────────────────

@pytest.mark.parametrize("overrides, fragment", [
    (["train.mini_batch_size=0"], "train.mini_batch_size"),
    (["train.mini_batch_size=-1"], "train.mini_batch_size"),
    (["train.per_device_train_batch_size=0", "train.mini_batch_size=0"], "train.per_device_train_batch_size"),
    (["matryoshka.dims=[128,768]"], "matryoshka.dims: must be strictly descending"),
    (["matryoshka.dims=[768,768]"], "matryoshka.dims: must be strictly descending"),
    (["matryoshka.dims=[768,0]"], "matryoshka.dims: every dim must be > 0"),
    (["matryoshka.dims=[768,-128]"], "matryoshka.dims: every dim must be > 0"),
    (["matryoshka.dims=[768,512,128]"], "matryoshka.weights: one weight per dim"),
    (["matryoshka.dims=[]", "matryoshka.weights=[]"], "matryoshka.dims: need at least one dim"),
    (["matryoshka.weights=[1.0,-0.1]"], "matryoshka.weights: every weight must be ≥ 0"),
    (["matryoshka.weights=[0,0]"], "matryoshka.weights: at least one weight must be > 0"),
    (["tasks.sts.balance_to=nope"], "tasks.sts.balance_to: no task named 'nope'; tasks are: retrieval, sts"),
    (["tasks.sts.balance_to=sts"], "tasks.sts.balance_to: a task cannot be balanced to itself"),
    (["tasks.sts.balance_to=retrieval", "tasks.retrieval.balance_to=sts"], "is itself balanced"),
    (['tasks.retrieval.columns=["query"]'], "tasks.retrieval.columns: loss 'mnrl' needs ≥ 2 columns"),
    (['tasks.retrieval.loss=cached_mnrl', 'tasks.retrieval.columns=[]'], "loss 'cached_mnrl' needs ≥ 2 columns"),
    (['tasks.sts.columns=["a","b"]'], "tasks.sts.columns: loss 'cosent' needs exactly 3 columns"),
    (['tasks.sts.loss=cosine', 'tasks.sts.columns=["a","b","c","d"]'], "loss 'cosine' needs exactly 3 columns"),
    (['tasks.sts.columns=["a","a","s"]'], "tasks.sts.columns: column names must be non-empty and distinct"),
    (["train.fp16=true", "train.bf16=true"], "train.fp16 and train.bf16"),
    (["train.warmup_ratio=1.5"], "train.warmup_ratio"),
    (["train.warmup_ratio=-0.1"], "train.warmup_ratio"),
    (["tasks={}"], "tasks: at least one task"),
    (["tasks.sts.scale=0"], "tasks.sts.scale"),
    (["tasks.sts.loss=cosine", "tasks.sts.scale=20"], "the 'cosine' loss has no scale"),
    (["tasks.sts.score_scale=0"], "tasks.sts.score_scale"),
    (["tasks.retrieval.score_scale=5"], "tasks.retrieval.score_scale: loss 'mnrl' uses no scores"),
    (["train.max_steps=0"], "train.max_steps"),
    (["train.num_train_epochs=0"], "train.num_train_epochs"),
    (["train.learning_rate=0"], "train.learning_rate"),
    (["train.weight_decay=-1"], "train.weight_decay"),
    (["train.max_grad_norm=-1"], "train.max_grad_norm"),
    (["train.seed=-1"], "train.seed"),
    (["train.logging_steps=0"], "train.logging_steps"),
    (["train.eval_steps=-1"], "train.eval_steps"),
    (["train.save_steps=-1"], "train.save_steps"),
    (["train.save_total_limit=0"], "train.save_total_limit"),
    (["train.metric_for_best_model=ndcg"], "train.metric_for_best_model: unknown metric 'ndcg'; valid: map@100"),
    (["train.load_best_model_at_end=true"], "needs at least one file in eval.ir"),
    (["train.load_best_model_at_end=true", "train.metric_for_best_model=spearman_cosine", 'eval.ir=["x"]'],
     "needs at least one file in eval.sts"),
    (["train.max_consecutive_nonfinite=0"], "train.max_consecutive_nonfinite"),
    (["speedups.memory_budget=-1"], "speedups.memory_budget"),
    (["speedups.length_multiple=0"], "speedups.length_multiple: expected ≥ 1 or null"),
    (["speedups.mini_batch_tokens=0"], "speedups.mini_batch_tokens: expected ≥ 1 or null"),
    (["speedups.auto_mini_batch_gib=0"], "speedups.auto_mini_batch_gib: expected > 0"),
    (["speedups.first_pass_mini_batch_size=64"], "speedups.first_pass_mini_batch_size: pass 1 in other chunks"),
    (['model.dropout_masks="keyed"', "speedups.first_pass_mini_batch_size=64", "speedups.linear_tape=true"],
     "speedups.first_pass_mini_batch_size: a separate first pass recomputes every mini-batch"),
    (['model.dropout_masks="keyed"', "speedups.first_pass_mini_batch_size=64",
      "speedups.length_multiple=32"], "speedups.length_multiple: static shapes cut pass 1"),
    (["speedups.cuda_graphs=true", "speedups.length_multiple=32"],
     'speedups.cuda_graphs: pass 3\'s replay must draw pass 1\'s dropout masks'),
    (['model.dropout_masks="keyed"', "speedups.cuda_graphs=true"],
     "speedups.cuda_graphs: graphs need mini-batch shapes that repeat"),
    (['model.dropout_masks="keyed"', "speedups.cuda_graphs=true", "speedups.length_multiple=32",
      "speedups.linear_tape=true"], "speedups.cuda_graphs: graphed passes recompute every"),
    (['model.dropout_masks="keyed"', "speedups.cuda_graphs=true", "speedups.length_multiple=32",
      "speedups.memory_budget=2"], "speedups.cuda_graphs: graphed passes recompute every"),
    # the old places of the speed-up keys still work, so their mistakes are still named (at the new place)
    (["train.grad_cache_memory_budget=-1"], "speedups.memory_budget: expected ≥ 0"),
    (["train.grad_cache_memory_budget=2", "speedups.memory_budget=1"],
     "train.grad_cache_memory_budget and speedups.memory_budget are the same key (it moved) and disagree"),
    (["speedups=null", "train.grad_cache_linear_tape=true"],
     "train.grad_cache_linear_tape (now speedups.linear_tape) is true (boolean), but speedups is null"),
    (["eval.dims=[128,128]"], "eval.dims"),
    (["eval.dims=[]"], "eval.dims"),
    (["eval.batch_size=0"], "eval.batch_size"),
    (['eval.index=["hnsw","hnsw"]'], "eval.index: expected distinct names from flat, sq8, binary-flat, hnsw"),
    (["eval.int8_quantile=0.5"], "eval.int8_quantile: expected in [0, 0.5) (0: min/max; p: the p and 1 − p"),
    (["eval.int8_quantile=-0.01"], "eval.int8_quantile: expected in [0, 0.5)"),
    (["eval.rescore=10", 'eval.precision=["int8"]'], "eval.rescore 10: rescoring re-ranks the binary search's"),
    (["model.max_seq_length=0"], "model.max_seq_length"),
    (['tasks.a.b.dataset=x', 'tasks.a.b.columns=["q","p"]', 'tasks.a.b.loss=mnrl'], "unknown key"),
])
def test_semantic_checks(overrides, fragment):
    assert fragment in error_of(*overrides)


def test_the_speedups_section_its_defaults_null_and_the_old_keys():
    cfg = build()
    assert cfg.speedups == SpeedupsConfig() and cfg.speedups.keep_last_graph and cfg.speedups.sparse_embedding_grads
    assert build("speedups=null").speedups is None  # the textbook
    assert build("speedups.linear_tape=true").speedups == SpeedupsConfig(linear_tape=True)  # the rest: defaults
    notices = []
    old = config_from_dict(apply_overrides(minimal(), ["train.grad_cache_memory_budget=2", "train.adamw_fused=true",
                                                       "train.grad_cache_first_pass_mini_batch_size=null"]),
                           notices=notices)
    assert old.speedups == SpeedupsConfig(memory_budget=2, adamw_fused=True)
    assert notices == ["train.grad_cache_memory_budget is now speedups.memory_budget (the old key still works)",
                       "train.grad_cache_first_pass_mini_batch_size is now speedups.first_pass_mini_batch_size "
                       "(the old key still works)",
                       "train.adamw_fused is now speedups.adamw_fused (the old key still works)"]
    # the same value at both places, or an old key at its default under "speedups": null, is no conflict
    assert build("train.grad_cache_memory_budget=2", "speedups.memory_budget=2").speedups.memory_budget == 2
    assert build("speedups=null", "train.grad_cache_linear_tape=false").speedups is None
    assert config_from_dict(config_to_dict(old)) == old  # the resolved config round-trips at the new places


@pytest.mark.parametrize("name", ["qa/it", "a/128d", "/"])
def test_a_task_name_with_a_slash_is_refused(name):
    """loss/NAME/DIMd: a '/' in NAME drew a task's total as a per-dim line in the curves and dropped it from the
    progress bar (both split the key at '/')."""
    data = minimal()
    data["tasks"][name] = data["tasks"].pop("retrieval")
    assert f"tasks.{name}: task names must be non-empty and contain no '.', '=' or '/'" in error_of(data=data)


def test_valid_edge_values():
    cfg = build("train.mini_batch_size=128", "train.warmup_ratio=0", "train.max_steps=5", "train.num_train_epochs=0",
                "train.max_grad_norm=0", "matryoshka.weights=[1,0]", "train.bf16=true")
    assert cfg.train.mini_batch_size == cfg.train.per_device_train_batch_size
    assert build("train.warmup_ratio=1").train.warmup_ratio == 1.0
    assert build("train.mini_batch_size=1").train.mini_batch_size == 1
    cfg = build('eval.index=["sq8","hnsw"]', "eval.int8_quantile=0.001")
    assert cfg.eval.index == ("sq8", "hnsw") and cfg.eval.int8_quantile == 0.001
    assert build().eval.index == () and build().eval.int8_quantile == 0.0  # the defaults: no index, min/max


@pytest.mark.parametrize("overrides, batch, mini", [
    (["train.mini_batch_size=129"], 128, 129),                    # texts of any column: B·columns may exceed B
    (["train.per_device_train_batch_size=8"], 8, 16),             # the default mini batch 16 > 8 is fine
    (["train.per_device_train_batch_size=2", "train.mini_batch_size=1000"], 2, 1000),
])
def test_mini_batch_size_may_exceed_the_batch_size(overrides, batch, mini):
    t = build(*overrides).train
    assert (t.per_device_train_batch_size, t.mini_batch_size) == (batch, mini)


def test_check_against_model():
    cfg = build()
    check_against_model(cfg, 768)
    with pytest.raises(ConfigError, match=r"matryoshka.dims: \[768\] larger than the model's embedding dim 384"):
        check_against_model(cfg, 384)
    with pytest.raises(ConfigError, match=r"eval.dims: \[1024\]"):
        check_against_model(build("eval.dims=[1024,128]", "matryoshka=null"), 768)
    with pytest.raises(ConfigError, match="model.max_seq_length"):
        check_against_model(build("model.max_seq_length=1024"), 768, max_positions=512)
    check_against_model(build("matryoshka=null"), 64)


def test_task_scale_defaults_to_the_loss_default():
    cfg = build("tasks.sts.scale=7")
    assert cfg.tasks["retrieval"].scale is None
    assert scale_of(cfg.tasks["retrieval"]) == DEFAULT_SCALE == 20.0
    assert scale_of(cfg.tasks["sts"]) == 7.0
    assert scale_of(build("tasks.sts.loss=cosine").tasks["sts"]) is None  # the cosine loss has no scale
    assert {name: loss.default_scale for name, loss in LOSSES.items()} == {
        "mnrl": 20.0, "cached_mnrl": 20.0, "cosent": 20.0, "cosine": None}


# ── files ────────────────────────────────────────────────────────────────────────────────────────────────────

def test_json_syntax_error_names_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{\n  "model": {"name_or_path": "x",}\n}\n')
    with pytest.raises(ConfigError, match=r"bad\.json:2:\d+: invalid JSON"):
        load_config(path)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"missing\.json: file not found"):
        load_config(tmp_path / "missing.json")
    (tmp_path / "latin1.json").write_bytes('{"model": {"name_or_path": "città"}}'.encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.json: not UTF-8 text \(.* at byte \d+\)"):
        load_config(tmp_path / "latin1.json")
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(ConfigError, match="top level must be a JSON object"):
        load_config(tmp_path / "list.json")
    (tmp_path / "dup.json").write_text('{"model": {"name_or_path": "a", "name_or_path": "b"}}')
    with pytest.raises(ConfigError, match="'name_or_path' appears twice"):
        load_config(tmp_path / "dup.json")


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(minimal()).encode("utf-8"))
    assert load_config(path) == build()


def test_round_trip(tmp_path):
    for cfg in (build(), build("matryoshka=null", "train.resume_from_checkpoint=true", 'eval.sts=["s.jsonl"]'),
                load_config(ROOT / "configs" / "v5.json"), load_config(ROOT / "configs" / "v4.json")):
        path = tmp_path / "run" / "config.json"
        save_config(cfg, path)
        assert load_config(path) == cfg
        data = json.loads(path.read_text())
        assert data == config_to_dict(cfg)
        assert isinstance(data["tasks"]["retrieval"]["columns"], list)
        assert config_from_dict(config_to_dict(cfg)) == cfg


def test_load_config_with_overrides(tmp_path):
    cfg = load_config(ROOT / "configs" / "v5.json", ["train.max_steps=10", "model.name_or_path=/models/x",
                                                     "matryoshka.dims=[384,128]", "matryoshka.weights=[1,1]"])
    assert cfg.train.max_steps == 10 and cfg.model.name_or_path == "/models/x"
    assert cfg.matryoshka.dims == (384, 128)


# ── the model card's numbers ─────────────────────────────────────────────────────────────────────────────────

def test_v5_matches_the_card():
    cfg = load_config(ROOT / "configs" / "v5.json")
    assert cfg.model.name_or_path == "indigo-ai/BERTino"
    assert cfg.model.max_seq_length == 256  # the card does not state it; see the report / README
    r, s = cfg.tasks["retrieval"], cfg.tasks["sts"]
    assert r.dataset == "nickprock/it-wiki-retrieval-synthetic-hn" and r.split == "train" and r.holdout == 0.05
    assert r.columns == ("query", "positive")  # 1 positive + the first 2 dense hard negatives of the list
    assert (r.negatives.column, r.negatives.count) == ("hard_negatives", 2)
    (dev,) = cfg.eval.sts
    assert (dev.dataset, dev.config, dev.split, dev.score_scale) == ("PhilipMay/stsb_multi_mt", "it", "dev", 5.0)
    assert r.loss == "cached_mnrl" and scale_of(r) == 20.0
    assert s.dataset == "PhilipMay/stsb_multi_mt" and s.config == "it" and s.split == "train"
    assert s.columns == ("sentence1", "sentence2", "similarity_score")
    assert s.loss == "cosent" and s.score_scale == 5.0 and s.balance_to == "retrieval"
    assert cfg.matryoshka.dims == (768, 512, 256, 128)
    assert cfg.matryoshka.weights == (1.0, 0.4, 0.2, 0.2)
    t = cfg.train
    assert t.per_device_train_batch_size == 128 and t.mini_batch_size == 16
    assert t.num_train_epochs == 4 and t.max_steps == -1
    assert t.learning_rate == 1e-5 and t.lr_scheduler_type == "cosine" and t.warmup_ratio == 0.1
    assert t.weight_decay == 0.01 and t.fp16 is True and t.bf16 is False
    assert t.batch_sampler == "no_duplicates" and t.multi_dataset_batch_sampler == "proportional"
    assert t.output_dir == "runs/v5"
    assert t.load_best_model_at_end and t.metric_for_best_model == "ndcg@10"
    assert 1250 % t.eval_steps == 0 and 1250 % t.save_steps == 0  # the card's best checkpoint is step 1250
    assert cfg.eval.ir == ()  # the IR evaluation is the retrieval task's 5% hold-out (tasks.retrieval.holdout)
    check_against_model(cfg, 768, max_positions=512)


def test_v4_differs_from_v5_exactly_as_the_card_says():
    v4 = config_to_dict(load_config(ROOT / "configs" / "v4.json"))
    v5 = config_to_dict(load_config(ROOT / "configs" / "v5.json"))
    assert v4["tasks"]["sts"]["loss"] == "cosine"                              # CosineSimilarityLoss in V4
    assert v4["tasks"]["sts"]["score_scale"] == 5.0                            # cosine loss needs [0, 1]
    assert v4["tasks"]["sts"]["balance_to"] is None                            # balancing is new in V5
    assert v4["matryoshka"]["weights"] == [1.0, 0.3, 0.15, 0.1]
    assert v4["train"]["lr_scheduler_type"] == "linear" and v4["train"]["weight_decay"] == 0.0
    assert v4["train"]["output_dir"] == "runs/v4"

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    diff = {k for k in flat(v5) if flat(v5)[k] != flat(v4)[k]}
    assert diff == {"tasks.sts.loss", "tasks.sts.scale", "tasks.sts.balance_to", "matryoshka.weights",
                    "train.lr_scheduler_type", "train.weight_decay", "train.output_dir"}


@pytest.mark.parametrize("name", ["demo", "v4", "v5"])
def test_the_shipped_configs_spell_out_every_speedup(name):
    """A reader of configs/*.json sees what runs: the `speedups` section with every switch, at its default."""
    import dataclasses

    data = json.loads((ROOT / "configs" / f"{name}.json").read_text())
    assert data["speedups"] == dataclasses.asdict(SpeedupsConfig())
    assert not [k for k in data["train"] if k.startswith("grad_cache") or k == "adamw_fused"]
