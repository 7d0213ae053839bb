"""The card's recipe in one command, offline: configs/v5.json on stand-ins of its hub model and datasets.

The stand-ins have the real layouts, in a Hugging Face hub cache as the hub client leaves it
(`<HF_HUB_CACHE>/{models,datasets}--ORG--NAME/{refs/main, snapshots/REV/...}`), under the exact ids configs/v5.json
names: `indigo-ai/BERTino` (a tiny DistilBERT MLM: config.json, a pickled pytorch_model.bin with the MLM key
names and more embedding rows than vocab.txt has tokens, vocab.txt, a tokenizer_config.json with the legacy
`max_len` key that lower-cases and strips accents, special_tokens_map.json — no safetensors, no tokenizer.json),
`nickprock/it-wiki-retrieval-synthetic-hn` (parquet, `query`/`positive`/`hard_negatives` as a list) and
`PhilipMay/stsb_multi_mt` (parquet per language and split, `similarity_score` float32, a README.md `configs:`
section). Snapshot files are plain
files here, not links into `blobs/`: the client reads both the same way.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import write_vocab
from helpers import ROOT, read_metrics, retrieval_rows, run_train, sts_rows, weights, write_config, write_jsonl

from bertino import SentenceEncoder
from bertino.errors import CheckpointError
from bertino.plumbing.config import load_config
from bertino.plumbing.data import batch_schedule, load_run_data

V5 = json.loads((ROOT / "configs" / "v5.json").read_text())
MODEL_ID = V5["model"]["name_or_path"]  # "indigo-ai/BERTino"
RETRIEVAL_ID = V5["tasks"]["retrieval"]["dataset"]  # "nickprock/it-wiki-retrieval-synthetic-hn"
STS_ID = V5["tasks"]["sts"]["dataset"]  # "PhilipMay/stsb_multi_mt"
REV = "0123456789abcdef0123456789abcdef01234567"
SIZES = ["model.max_seq_length=32", "matryoshka.dims=[32,16,8,4]", "eval.dims=[32,4]",
         "train.per_device_train_batch_size=8", "train.mini_batch_size=8", "train.max_steps=3", "train.fp16=false",
         "train.save_steps=0", "train.logging_steps=1"]
RUN_SIZES = [o for o in SIZES if not o.startswith(("train.max_steps", "train.save_steps"))] + [
    "train.max_steps=4", "train.save_steps=2", "train.eval_steps=2"]


def snapshot(hub: Path, kind: str, repo_id: str) -> Path:
    """An empty snapshot folder of `repo_id` in the hub cache, with refs/main pointing at it."""
    repo = hub / f"{kind}--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(REV)
    folder = repo / "snapshots" / REV
    folder.mkdir(parents=True, exist_ok=True)
    return folder


EXTRA_ROWS = 32  # indigo-ai/BERTino: vocab.txt has 31,102 tokens, its embedding table 32,102 rows (~3% unused)


def write_bertino_layout(folder: Path, *, seed: int = 0, do_lower_case: bool = True) -> Path:
    """indigo-ai/BERTino's files, in their shape: a DistilBertForMaskedLM config and pickle whose embedding table
    has more rows than vocab.txt has tokens, a WordPiece vocab, a tokenizer_config.json with the legacy `max_len`
    key (no `model_max_length`) that lower-cases (and so strips accents, as BERT's tokenizer does), no
    tokenizer.json."""
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    vocab = write_vocab(folder).read_text(encoding="utf-8").split()
    cfg = DistilBertConfig(vocab_size=len(vocab) + EXTRA_ROWS, dim=32, n_layers=2, n_heads=4, hidden_dim=128,
                           max_position_embeddings=64, architectures=["DistilBertForMaskedLM"])
    torch.manual_seed(seed)
    model = DistilBertForMaskedLM(cfg)
    cfg.save_pretrained(str(folder))
    torch.save(model.state_dict(), folder / "pytorch_model.bin")  # distilbert.* and vocab_* keys, as on the hub
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": do_lower_case, "max_len": 512}))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
         "mask_token": "[MASK]"}))
    return folder


def retrieval_table(n: int, short_every: int = 0) -> pa.Table:
    """nickprock/it-wiki-retrieval-synthetic-hn's columns; every `short_every`-th row has one negative only."""
    rows = retrieval_rows(n)
    negatives = [[r["negative_1"], r["negative_2"], f"terzo {i}"] for i, r in enumerate(rows)]
    for i in range(0, n, short_every) if short_every else ():
        negatives[i] = negatives[i][:1]
    return pa.table({"query": [r["query"] for r in rows], "positive": [r["positive"] for r in rows],
                     "hard_negatives": pa.array(negatives, type=pa.list_(pa.string()))})


def write_sts_repo(folder: Path, sizes: dict[str, int]) -> None:
    """PhilipMay/stsb_multi_mt: LANG/SPLIT-00000-of-00001.parquet and the README.md that maps configs to files."""
    yaml = ["---", "configs:"]
    for lang in ("it", "de"):
        yaml += [f"- config_name: {lang}", "  data_files:"]
        for split, n in sizes.items():
            rows = sts_rows(n, seed=hash(split) % 100)
            (folder / lang).mkdir(exist_ok=True)
            pq.write_table(pa.table({"sentence1": [f"{lang} {r['sentence1']}" for r in rows],
                                     "sentence2": [r["sentence2"] for r in rows],  # float32, as on the hub:
                                     "similarity_score": pa.array([r["score"] for r in rows], pa.float32())}),
                           folder / lang / f"{split}-00000-of-00001.parquet")
            yaml += [f"  - split: {split}", f"    path: {lang}/{split}-*"]
    (folder / "README.md").write_text("\n".join(yaml + ["---", "", "stand-in"]) + "\n")


def write_retrieval_repo(folder: Path, table: pa.Table) -> None:
    (folder / "data").mkdir(exist_ok=True)
    pq.write_table(table, folder / "data" / "train-00000-of-00001.parquet")
    (folder / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
                                      "    path: data/train-*\n---\n")


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory) -> Path:
    """A hub cache holding the card's model and datasets under configs/v5.json's ids."""
    home = tmp_path_factory.mktemp("hf_home")
    hub = home / "hub"
    write_bertino_layout(snapshot(hub, "models", MODEL_ID))
    write_retrieval_repo(snapshot(hub, "datasets", RETRIEVAL_ID), retrieval_table(80, short_every=10))
    write_sts_repo(snapshot(hub, "datasets", STS_ID), {"train": 30, "dev": 12, "test": 10})
    return home


def offline_env(home: Path, tmp: Path) -> dict[str, str]:
    return {"HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"), "HF_DATASETS_CACHE": str(tmp / "datasets"),
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "BERTINO_CACHE": str(tmp / "bertino-cache")}


@pytest.fixture
def offline_hub(hf_home, tmp_path, monkeypatch) -> Path:
    """The same, in this process: the hub clients read these settings at import, so their constants are patched."""
    import datasets
    import huggingface_hub

    env = offline_env(hf_home, tmp_path)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", env["HF_HUB_CACHE"])
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", Path(env["HF_DATASETS_CACHE"]))
    return hf_home


def run_offline(home: Path, tmp: Path, config: Path, *overrides: str):
    saved = dict(os.environ)
    os.environ.update(offline_env(home, tmp))
    try:
        return run_train(config, *overrides, timeout=600)
    finally:
        os.environ.clear()
        os.environ.update(saved)


# ──────────────────────────────────────────────────────────────────────────────────────────────── one command
@pytest.fixture(scope="module")
def v5_run(hf_home, tmp_path_factory):
    """`python train.py --config configs/v5.json` + size overrides, 4 steps, a checkpoint and an evaluation every
    2 → (the run folder, its stderr)."""
    tmp = tmp_path_factory.mktemp("v5_run")
    proc = run_offline(hf_home, tmp, ROOT / "configs" / "v5.json", *RUN_SIZES, f"train.output_dir={tmp / 'run'}")
    return tmp / "run", proc


def test_v5_config_runs_end_to_end_on_the_hub_stand_ins(v5_run):
    """configs/v5.json + size overrides: trains, evaluates on the hold-out and the STS dev set, writes the model
    card; the summary line gives rows, hold-out, dropped rows, steps per epoch, total."""
    run, proc = v5_run
    # 80 rows, 8 with one negative only → 72; 5% hold-out → round(3.6) = 4 held out, 68 trained on;
    # STS (30 rows) balanced to 68. Steps/epoch: ceil(68/8) + ceil(68/8) = 18.
    assert "retrieval 68 (4 held out, 8 dropped: short negatives lists); sts 68" in proc.stderr, proc.stderr
    assert "18 steps/epoch, 4 steps" in proc.stderr
    assert "converting them once, safely" in proc.stderr  # the pickle → the cache, with its notice
    evals = [r["eval"] for r in read_metrics(run) if "eval" in r]
    assert set(evals[-1]["32"]) == {"retrieval_holdout", "sts_dev"}
    card = (run / "final" / "README.md").read_text()
    assert "retrieval_holdout" in card and "sts_dev" in card and "indigo-ai/BERTino" in card
    # eval.compare_base (on in configs/v5.json): the base model beside the trained one, with relative changes
    section = card[card.index("## Comparison with the base model"):]
    assert "| metric | base model indigo-ai/BERTino (32d) | this model (32d) |" in section and "%) |" in section


def test_step_counts_of_the_card_size_data(tmp_path):
    """50,001 retrieval rows, a 5% hold-out, STS balanced to the rest, batch 128: the arithmetic of the card."""
    import train

    data = tmp_path / "card_size.parquet"  # the retrieval repo's one parquet file, 50,001 rows
    pq.write_table(retrieval_table(50_001), data)
    sts = tmp_path / "sts_train.parquet"  # stsb_multi_mt it/train's size
    rows = sts_rows(5_749)
    pq.write_table(pa.table({"sentence1": [r["sentence1"] for r in rows], "sentence2": [r["sentence2"] for r in rows],
                             "similarity_score": [r["score"] for r in rows]}), sts)
    cfg = load_config(ROOT / "configs" / "v5.json", [
        f"tasks.retrieval.dataset={data}", f"tasks.sts.dataset={sts}", *SIZES[:3], "train.max_steps=-1", "train.fp16=false",
        f"train.output_dir={tmp_path / 'run'}"])
    data = load_run_data(cfg)
    batches = batch_schedule(cfg, data.tasks)
    # the fields summary_line reads, as train.setup fills them (setup itself also loads the model)
    run = SimpleNamespace(tasks=data.tasks, holdouts=data.holdouts, steps_per_epoch=len(batches),
                          total_steps=cfg.train.num_train_epochs * len(batches), resume_from=None,
                          dist_info=SimpleNamespace(world_size=1), device="cpu", amp_dtype=None)
    held = round(0.05 * 50_001)  # 2500
    trained = 50_001 - held  # 47501; STS is balanced to the same count
    per_epoch = 2 * -(-trained // 128)  # ceil(47501 / 128) = 372 per task
    assert (held, trained, per_epoch) == (2500, 47501, 744)
    line = train.summary_line(run)
    assert f"retrieval {trained} ({held} held out); sts {trained}" in line
    assert f"{per_epoch} steps/epoch, {4 * per_epoch} steps" in line  # 4 epochs: 2976


# ──────────────────────────────────────────────────────────────────────────────────────────────── list-valued negatives
def test_a_list_column_gives_the_batches_and_losses_of_flat_columns(tiny_model_dir, tmp_path):
    """The same rows as `hard_negatives` (a list, parquet) and as `negative_1`/`negative_2` (JSONL): the same
    texts, the same batch schedule, and bitwise the same losses and weights after training."""
    table = retrieval_table(40, short_every=8)
    pq.write_table(table, tmp_path / "list.parquet")
    kept = [r for r in table.to_pylist() if len(r["hard_negatives"]) >= 2]
    write_jsonl(tmp_path / "flat.jsonl", [{"query": r["query"], "positive": r["positive"],
                                           "negative_1": r["hard_negatives"][0], "negative_2": r["hard_negatives"][1]}
                                          for r in kept])
    base = {"model": {"name_or_path": str(tiny_model_dir), "max_seq_length": 32},
            "matryoshka": {"dims": [32, 16], "weights": [1.0, 0.4]},
            "train": {"per_device_train_batch_size": 6, "mini_batch_size": 4, "max_steps": 4, "learning_rate": 1e-3,
                      "seed": 3, "logging_steps": 1, "save_steps": 0}}
    flat = {**base, "tasks": {"r": {"dataset": str(tmp_path / "flat.jsonl"), "loss": "cached_mnrl",
                                    "columns": ["query", "positive", "negative_1", "negative_2"]}}}
    listed = {**base, "tasks": {"r": {"dataset": str(tmp_path / "list.parquet"), "loss": "cached_mnrl",
                                      "columns": ["query", "positive"],
                                      "negatives": {"column": "hard_negatives", "count": 2}}}}
    from bertino.plumbing.config import config_from_dict

    a, b = (load_run_data(config_from_dict(c)).tasks["r"] for c in (flat, listed))
    assert a.text_rows() == b.text_rows() and b.dropped_rows == 5
    def first_batches(cfg, data, n=8):  # the stream is endless: its first n (epoch, index, task, rows)
        return list(itertools.islice(batch_schedule(config_from_dict(cfg), {"r": data}).stream(0, 0), n))

    assert first_batches(flat, a) == first_batches(listed, b)
    runs = {}
    for name, cfg in (("flat", flat), ("list", listed)):
        cfg = {**cfg, "train": {**cfg["train"], "output_dir": str(tmp_path / name)}}
        run_train(write_config(tmp_path, cfg, f"{name}.json"))
        runs[name] = tmp_path / name
    losses = [[r["loss/r"] for r in read_metrics(runs[n]) if "loss/r" in r] for n in ("flat", "list")]
    assert losses[0] == losses[1] and len(losses[0]) == 4
    assert all(torch.equal(x, weights(runs["list"] / "final")[k]) for k, x in weights(runs["flat"] / "final").items())


def test_short_rows_error_names_the_row(tmp_path):
    from bertino.errors import DataError
    from bertino.plumbing.config import NegativesConfig, TaskConfig
    from bertino.plumbing.data import load_task

    pq.write_table(retrieval_table(12, short_every=5), tmp_path / "r.parquet")
    task = TaskConfig(dataset=str(tmp_path / "r.parquet"), columns=("query", "positive"), loss="mnrl",
                      negatives=NegativesConfig("hard_negatives", 2, short_rows="error"))
    with pytest.raises(DataError, match=r"r.parquet row 0: column 'hard_negatives' has 1 item\(s\)"):
        load_task(task, "r")
    three = load_task(TaskConfig(dataset=str(tmp_path / "r.parquet"), columns=("query", "positive"), loss="mnrl",
                                 negatives=NegativesConfig("hard_negatives", 1)), "r")
    assert len(three) == 12 and three.text_rows()[1][2] == retrieval_table(12).column("hard_negatives")[1][0].as_py()


# ──────────────────────────────────────────────────────────────────────────────────────────────── hold-out
def test_holdout_is_disjoint_deterministic_and_its_ir_corpus(offline_hub):
    """The hold-out never reaches training, is the same rows on every load (every run, rank and resume reads it
    this way, seeded by train.seed and the task name), and its IR set searches its positives and negatives."""
    from bertino.plumbing.eval_data import load_eval_sets

    cfg = load_config(ROOT / "configs" / "v5.json", ["train.per_device_train_batch_size=8"])
    first, second = load_run_data(cfg), load_run_data(cfg)
    held, trained = first.holdouts["retrieval"], first.tasks["retrieval"]
    assert len(held) == 4 and len(trained) == 68
    assert set(held.row_ids.tolist()).isdisjoint(trained.row_ids.tolist())
    assert {row[0] for row in held.text_rows()}.isdisjoint(row[0] for row in trained.text_rows())
    assert held.text_rows() == second.holdouts["retrieval"].text_rows() and trained.text_rows() == second.tasks["retrieval"].text_rows()
    held_ids = set(held.row_ids.tolist())
    for rank in (0, 1):  # each rank's share of every batch: source rows of training only
        stream = batch_schedule(cfg, first.tasks, world_size=2, rank=rank).stream(0, 0)
        seen = {int(trained.row_ids[i]) for _, _, task, rows in (next(stream) for _ in range(30))
                if task == "retrieval" for i in rows}
        assert seen and not seen & held_ids
    (ir,), (sts,) = load_eval_sets(cfg.eval.ir, cfg.eval.sts, first.holdouts)
    assert ir.name == "retrieval_holdout" and ir.queries == [row[0] for row in held.text_rows()]
    assert set(ir.corpus) == {t for row in held.text_rows() for t in row[1:]}  # positives and both hard negatives
    assert sts.name == "sts_dev" and len(sts.sentences1) == 12 and max(sts.scores) <= 1.0  # dev split, / 5


def test_the_two_stage_recipe_holds_out_the_same_rows(offline_hub):
    """The README's path to the published V5 (configs/v4.json, then configs/v5.json from runs/v4/final): both
    configs leave out the same retrieval rows, so stage 2 never trains on what stage 1 held out."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "python train.py --config configs/v4.json " in readme
    assert "python train.py --config configs/v5.json model.name_or_path=runs/v4/final " in readme
    v4 = load_config(ROOT / "configs" / "v4.json", ["train.per_device_train_batch_size=8"])
    assert v4.train.output_dir == "runs/v4"
    v5 = load_config(ROOT / "configs" / "v5.json", ["train.per_device_train_batch_size=8",
                                                    "model.name_or_path=runs/v4/final"])
    held = [load_run_data(cfg).holdouts["retrieval"] for cfg in (v4, v5)]
    assert held[0].text_rows() == held[1].text_rows() and len(held[0]) == 4


def test_a_resume_keeps_the_hold_out(hf_home, v5_run, tmp_path):
    """The v5 run resumed from its step-2 checkpoint into another folder: the same hold-out rows are left out and
    evaluated (the same numbers at step 4) and the weights end bitwise where the uninterrupted run's do."""
    whole_run, _ = v5_run
    proc = run_offline(hf_home, tmp_path, ROOT / "configs" / "v5.json", *RUN_SIZES,
                       f"train.output_dir={tmp_path / 'resumed'}",
                       f"train.resume_from_checkpoint={whole_run / 'checkpoint-2'}")
    assert "4 held out" in proc.stderr, proc.stderr

    def holdout_evals(run):
        return {r["step"]: r["eval"]["32"]["retrieval_holdout"] for r in read_metrics(run) if "eval" in r}

    whole, resumed = holdout_evals(whole_run), holdout_evals(tmp_path / "resumed")
    assert set(whole) == {2, 4} and set(resumed) == {4} and whole[4] == resumed[4]  # a new folder: its own log
    a, b = weights(whole_run / "final"), weights(tmp_path / "resumed" / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)


# ──────────────────────────────────────────────────────────────────────────────────────────────── a clone of a repo
def clone_of(repo_id: str, tmp: Path) -> Path:
    """What `git clone https://huggingface.co/datasets/REPO` leaves: the repo's files (data + README.md)."""
    import shutil

    import huggingface_hub

    clone = tmp / "clones" / repo_id.split("/")[1]
    shutil.copytree(huggingface_hub.snapshot_download(repo_id, repo_type="dataset"), clone)
    return clone


def test_a_local_clone_of_a_hub_dataset_repo_loads_as_its_hub_id(offline_hub, tmp_path):
    """A cluster without internet uses a clone of the repo: train.py's tasks (configs/v5.json with the clones as
    datasets) and evaluate.py's eval sets read the same rows, scores, hold-out and sets as from the hub ids."""
    from bertino.plumbing.eval_data import load_eval_sets

    retrieval, sts = clone_of(RETRIEVAL_ID, tmp_path), clone_of(STS_ID, tmp_path)
    by_id = load_config(ROOT / "configs" / "v5.json", ["train.per_device_train_batch_size=8"])
    by_clone = load_config(ROOT / "configs" / "v5.json", ["train.per_device_train_batch_size=8",
                                                          f"tasks.retrieval.dataset={retrieval}",
                                                          f"tasks.sts.dataset={sts}",
                                                          f'eval.sts=[{{"dataset": "{sts}", "config": "it", '
                                                          f'"split": "dev", "columns": ["sentence1", "sentence2", '
                                                          f'"similarity_score"], "score_scale": 5.0, '
                                                          f'"name": "sts_dev"}}]'])
    a, b = load_run_data(by_id), load_run_data(by_clone)
    for name in ("retrieval", "sts"):
        assert len(a.tasks[name]) > 0 and a.tasks[name].text_rows() == b.tasks[name].text_rows()
        assert (a.tasks[name].scores is None) == (b.tasks[name].scores is None)
        if a.tasks[name].scores is not None:
            assert np.array_equal(a.tasks[name].scores, b.tasks[name].scores)
    assert a.holdouts["retrieval"].text_rows() == b.holdouts["retrieval"].text_rows()
    (ir_a,), (sts_a,) = load_eval_sets(by_id.eval.ir, by_id.eval.sts, a.holdouts)
    (ir_b,), (sts_b,) = load_eval_sets(by_clone.eval.ir, by_clone.eval.sts, b.holdouts)
    assert (ir_a.queries, ir_a.corpus, ir_a.relevant) == (ir_b.queries, ir_b.corpus, ir_b.relevant)
    assert (sts_a.sentences1, sts_a.sentences2, sts_a.scores) == (sts_b.sentences1, sts_b.sentences2, sts_b.scores)
    assert len(sts_b.scores) == 12  # the "it" config's dev split, as the README's configs: section maps it


def test_mine_reads_a_clone_of_a_hub_dataset_repo_as_its_hub_id(offline_hub, tiny_model_dir, tmp_path):
    """`python -m bertino.mine --input CLONE` mines the rows `--input HUB_ID` mines (the same bytes written)."""
    from bertino.mine import run

    clone = clone_of(RETRIEVAL_ID, tmp_path)
    common = ["--model", str(tiny_model_dir), "--range-min", "2", "--range-max", "30", "--no-progress",
              "--cache-dir", str(tmp_path / "cache")]
    assert run([*common, "--input", RETRIEVAL_ID, "--output", str(tmp_path / "hub.jsonl")]) == 0
    assert run([*common, "--input", str(clone), "--output", str(tmp_path / "clone.jsonl")]) == 0
    mined = (tmp_path / "hub.jsonl").read_bytes()
    assert mined and mined == (tmp_path / "clone.jsonl").read_bytes()


# ──────────────────────────────────────────────────────────────────────────────────────────────── the base model
def test_bertino_hub_layout_loads_like_transformers(offline_hub):
    """indigo-ai/BERTino from its hub files (pickled MLM weights, vocab.txt): the same embeddings as transformers'
    DistilBertModel from the same files (≤ 1e-5), and the tokenizer lower-cases as tokenizer_config.json says."""
    import huggingface_hub
    from transformers import AutoTokenizer, DistilBertModel

    ours = SentenceEncoder.from_pretrained(MODEL_ID)
    folder = huggingface_hub.snapshot_download(MODEL_ID)
    reference = DistilBertModel.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    texts = ["Chi ha dipinto la GIOCONDA?", "il gatto dorme a casa", "Roma", "Città più bella, perché è così"]
    features = tokenizer(texts, padding=True, return_tensors="pt")
    plain = [t.lower().replace("à", "a").replace("ù", "u").replace("é", "e").replace("è", "e").replace("ì", "i")
             for t in texts]  # lower-cased, accents stripped
    assert features["input_ids"].tolist() == tokenizer(plain, padding=True)["input_ids"]
    assert ours.tokenize(texts)["input_ids"].tolist() == features["input_ids"].tolist()
    assert ours.model.config.vocab_size == len(tokenizer) + EXTRA_ROWS  # the table's unused rows load too
    assert tokenizer.model_max_length == 512 and ours.max_seq_length == 64  # max_len read; the positions cap it
    with torch.no_grad():
        hidden = reference(input_ids=features["input_ids"], attention_mask=features["attention_mask"])[0]
    mask = features["attention_mask"].unsqueeze(-1).float()
    expected = ((hidden * mask).sum(1) / mask.sum(1)).numpy()
    np.testing.assert_allclose(ours.encode(texts), expected, atol=1e-5, rtol=0)


MARKER = Path(os.environ.get("TMPDIR", "/tmp")) / f"bertino-hub-pwned-{os.getpid()}"


class RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


def test_a_malicious_pickle_in_the_hub_cache_is_refused(offline_hub, tmp_path):
    """A hub repo whose pytorch_model.bin would run code while unpickling: refused, the marker never appears,
    nothing lands in the cache."""
    import huggingface_hub

    MARKER.unlink(missing_ok=True)
    evil = snapshot(Path(huggingface_hub.constants.HF_HUB_CACHE), "models", "evil-org/BERTino")
    write_bertino_layout(evil)
    state = torch.load(evil / "pytorch_model.bin", weights_only=True)
    torch.save({**state, "payload": RunsCode()}, evil / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"refused by torch.load\(weights_only=True\)"):
        SentenceEncoder.from_pretrained("evil-org/BERTino")
    assert not MARKER.exists()
    assert not list((tmp_path / "bertino-cache").rglob("*.safetensors"))
