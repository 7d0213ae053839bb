"""bertino.hard_negatives and bertino.mine: the mining rule against a brute-force full-matrix version, its
guarantees, the CLI and its errors."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import zlib
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

from bertino import SentenceEncoder
from bertino.errors import ConfigError, DataError
from bertino.hard_negatives import mine, mine_with_stats, select_negatives
from bertino.mine import load_corpus, run, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
TOPICS = ["gatto", "cane", "casa", "libro", "tabella", "testo", "pagina", "documento", "formato", "cella", "roma",
          "milano", "acqua", "sole", "mare", "leonardo", "gioconda", "louvre"]


def italian_rows(n: int = 30) -> list[dict]:
    """Synthetic pairs; "dove è il gatto" appears three times with different positives (one repeated)."""
    rows = []
    for i in range(n):
        t, u = TOPICS[i % len(TOPICS)], TOPICS[(3 * i + 1) % len(TOPICS)]
        rows.append({"query": f"dove è il {t} {i}", "positive": f"il {t} {i} è nella pagina del {u}"})
    rows.insert(5, {"query": "dove è il gatto", "positive": "il gatto dorme sulla casa"})
    rows.insert(11, {"query": "dove è il gatto", "positive": "un gatto nero vicino al mare"})
    rows.insert(20, {"query": "dove è il gatto", "positive": "il gatto dorme sulla casa"})
    return rows


class LookupEncoder:
    """A stand-in encoder: each text's vector is a pure function of the text (a crc32-seeded draw), so every order
    and batching gives the same bits. Texts listed in `same_as` copy another text's vector (exact ties)."""

    def __init__(self, dim: int = 6, same_as: dict[str, str] | None = None):
        self.dim, self.same_as = dim, same_as or {}

    def vector(self, text: str) -> torch.Tensor:
        text = self.same_as.get(text, text)
        rng = np.random.default_rng(zlib.crc32(text.encode("utf-8")))
        return torch.tensor(rng.standard_normal(self.dim), dtype=torch.float32)

    def encode(self, texts, batch_size=32, normalize=False, show_progress_bar=None, convert_to_tensor=False):
        emb = torch.stack([self.vector(t) for t in texts])  # (N, D)
        return torch.nn.functional.normalize(emb, dim=-1) if normalize else emb


# ================================================================================================ brute force
def cosine_matrix(encoder, queries: list[str], corpus: list[str], batch_size: int = 64) -> np.ndarray:
    """The whole (Q, N) cosine matrix, float64 math rounded to float32 (as the chunked code scores).

    All texts are encoded in one call, in mine's order (queries, then corpus), so a real encoder gives the same bits.
    """
    texts = list(dict.fromkeys(queries + corpus))
    emb = torch.as_tensor(encoder.encode(texts, batch_size=batch_size, normalize=True)).double()  # (T, D)
    q = torch.nn.functional.normalize(emb[[texts.index(t) for t in queries]], dim=-1)  # (Q, D)
    c = emb[[texts.index(t) for t in corpus]]  # (N, D)
    return ((q @ c.T) / c.norm(dim=1)).float().numpy()


def brute_force_survivors(encoder, rows, *, corpus_extra=(), range_min=10, range_max=50, margin=0.05,
                          max_score=None, relative_margin=None, batch_size=64) -> list[list[str]]:
    """The module docstring's rule, literally: each row's surviving candidates, in rank order (Python loops)."""
    corpus = list(dict.fromkeys([r["positive"] for r in rows] + list(corpus_extra)))
    queries = list(dict.fromkeys(r["query"] for r in rows))
    scores = cosine_matrix(encoder, queries, corpus, batch_size)  # (Q, N)
    positives = defaultdict(set)
    for r in rows:
        positives[r["query"]].add(r["positive"])
    out = []
    for r in rows:
        s = scores[queries.index(r["query"])]
        ranking = sorted(range(len(corpus)), key=lambda j: (-s[j], j))  # the full ranking, ties by corpus id
        pos = float(s[corpus.index(r["positive"])])
        survivors = []
        for rank, j in enumerate(ranking):
            text = corpus[j]
            if not range_min <= rank < range_max or text in positives[r["query"]] or text == r["query"]:
                continue
            if margin is not None and not float(s[j]) < pos - margin:
                continue
            if max_score is not None and not float(s[j]) <= max_score:
                continue
            if relative_margin is not None and not float(s[j]) <= pos * (1 - relative_margin):
                continue
            survivors.append(text)
        out.append(survivors)
    return out


def brute_force(encoder, rows, *, k=2, **settings) -> list[dict]:
    """Rows with at least k survivors, each with its first k."""
    return [{"query": r["query"], "positive": r["positive"], **{f"negative_{i + 1}": t for i, t in enumerate(s[:k])}}
            for r, s in zip(rows, brute_force_survivors(encoder, rows, **settings)) if len(s) >= k]


@pytest.mark.parametrize("settings", [
    dict(k=2, range_min=10, range_max=50, margin=0.05),
    dict(k=3, range_min=0, range_max=8, margin=None),
    dict(k=1, range_min=4, range_max=12, margin=0.0),
    dict(k=3, range_min=2, range_max=20, margin=None, max_score=0.0),
])
def test_matches_brute_force(settings):
    enc, rows, settings = LookupEncoder(), italian_rows(), dict(settings)
    k = settings.pop("k")
    expected = brute_force(enc, rows, k=k, **settings)
    assert 0 < len(expected) < len(rows) or settings["range_min"] == 0  # the filters do something
    for chunk_size in (1, 7, 50_000):
        got = mine(enc, rows, num_negatives=k, chunk_size=chunk_size, **settings)
        assert got == expected, chunk_size


def test_ties_are_ranked_by_corpus_id():
    # Three corpus texts share one vector: their order in the window must be their corpus (first-seen) order.
    rows = italian_rows(12)
    twins = [rows[7]["positive"], rows[2]["positive"], rows[9]["positive"]]
    enc = LookupEncoder(same_as={twins[1]: twins[0], twins[2]: twins[0]})
    for chunk_size in (1, 2, 100):
        got = mine(enc, rows, num_negatives=6, range_min=0, range_max=20, margin=None, chunk_size=chunk_size)
        assert got == brute_force(enc, rows, k=6, range_min=0, range_max=20, margin=None)
        for row in got:
            negs = [row[f"negative_{i}"] for i in range(1, 7)]
            present = [negs.index(t) for t in sorted(twins, key=lambda t: [r["positive"] for r in rows].index(t))
                       if t in negs]
            assert present == sorted(present)


def test_repeated_query_never_gets_any_of_its_positives():
    # With range_min=0 and no margin, the query's own positives are at the top of its ranking: all must be skipped.
    enc, rows = LookupEncoder(), italian_rows()
    got = mine(enc, rows, num_negatives=4, range_min=0, range_max=10, margin=None)
    cat = [r for r in got if r["query"] == "dove è il gatto"]
    assert len(cat) == 3  # every input row of the repeated query is kept, in input order
    assert [r["positive"] for r in cat] == ["il gatto dorme sulla casa", "un gatto nero vicino al mare",
                                            "il gatto dorme sulla casa"]
    all_positives = {"il gatto dorme sulla casa", "un gatto nero vicino al mare"}
    for r in cat:
        assert not all_positives & {r[f"negative_{i}"] for i in range(1, 5)}


def test_a_query_that_is_also_a_corpus_text_is_not_its_own_negative():
    enc, rows = LookupEncoder(), italian_rows(10)
    got = mine(enc, rows, corpus=["dove è il gatto 0"], num_negatives=9, range_min=0, range_max=11, margin=None)
    row = next(r for r in got if r["query"] == "dove è il gatto 0")
    assert "dove è il gatto 0" not in [row[f"negative_{i}"] for i in range(1, 10)]
    assert any("dove è il gatto 0" in r.values() for r in got if r["query"] != "dove è il gatto 0")  # others may


def test_guarantees_with_a_real_encoder(tiny_model_dir):
    """No positive of the query, distinct negatives, the margin, the window: checked on the tiny DistilBERT."""
    enc, rows = SentenceEncoder.from_pretrained(tiny_model_dir), italian_rows()
    margin, k, range_min, range_max = 0.002, 2, 3, 20
    got, stats = mine_with_stats(enc, rows, num_negatives=k, range_min=range_min, range_max=range_max,
                                 margin=margin, batch_size=4)
    assert stats.rows_in == len(rows) and stats.rows_out == len(got) > 0 and stats.corpus_size == 32
    assert stats.mean_negative_score < stats.mean_positive_score
    corpus = list(dict.fromkeys(r["positive"] for r in rows))
    queries = list(dict.fromkeys(r["query"] for r in rows))
    scores = cosine_matrix(enc, queries, corpus, batch_size=4)  # (Q, N), the very embeddings mine used
    positives = defaultdict(set)
    for r in rows:
        positives[r["query"]].add(r["positive"])
    for r in got:
        negs = [r[f"negative_{i}"] for i in range(1, k + 1)]
        s = scores[queries.index(r["query"])]
        rank = {j: i for i, j in enumerate(sorted(range(len(corpus)), key=lambda j: (-s[j], j)))}
        pos = s[corpus.index(r["positive"])]
        assert len(set(negs)) == k
        assert not set(negs) & positives[r["query"]]
        for t in negs:
            j = corpus.index(t)
            assert float(s[j]) < float(pos) - margin
            assert range_min <= rank[j] < range_max
    # and the exact rule
    assert got == brute_force(enc, rows, k=k, range_min=range_min, range_max=range_max, margin=margin, batch_size=4)


def test_random_sampling_is_seeded_and_follows_the_rule():
    enc, rows = LookupEncoder(), italian_rows()
    common = dict(num_negatives=2, range_min=1, range_max=25, margin=0.0)
    a = mine(enc, rows, sampling="random", seed=1, **common)
    assert a == mine(enc, rows, sampling="random", seed=1, chunk_size=3, **common)  # same draw, any chunking
    assert a != mine(enc, rows, sampling="random", seed=2, **common)
    assert a != mine(enc, rows, **common)  # not just the top survivors
    survivors = brute_force_survivors(enc, rows, range_min=1, range_max=25, margin=0.0)
    kept = iter(a)
    for r, s in zip(rows, survivors):  # the rows with >= 2 survivors, each with 2 of them, in rank order
        if len(s) >= 2:
            got = next(kept)
            assert (got["query"], got["positive"]) == (r["query"], r["positive"])
            assert [got["negative_1"], got["negative_2"]] == [t for t in s if t in got.values()]
    assert next(kept, None) is None


def test_settings_are_checked():
    enc, rows = LookupEncoder(), italian_rows(6)
    with pytest.raises(ConfigError, match="range_min < range_max"):
        mine(enc, rows, range_min=5, range_max=5)
    with pytest.raises(ConfigError, match="num_negatives"):
        mine(enc, rows, num_negatives=0)
    with pytest.raises(ConfigError, match="holds 2 candidates, fewer than num_negatives=3"):
        mine(enc, rows, num_negatives=3, range_min=1, range_max=3)
    with pytest.raises(ConfigError, match="margin"):
        mine(enc, rows, margin=-0.1)
    with pytest.raises(DataError, match=r"the corpus has 8 texts, so ranks \[7, 50\) hold 1 candidates"):
        mine(enc, rows, num_negatives=2, range_min=7, range_max=50)
    with pytest.raises(DataError, match=r"rows\[1\]\['positive'\]: expected a string, found no such key "
                                        r"\(keys \['query'\]\)"):
        mine(enc, [rows[0], {"query": "x"}])
    with pytest.raises(DataError, match=r"rows\[0\]\['query'\]: expected a string, found int \(3\)"):
        mine(enc, [{"query": 3, "positive": "x"}])


def test_select_negatives_pads_rows_with_too_few_survivors():
    q = torch.tensor([[1.0, 0.0]])  # (1, 2)
    corpus = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.5, 0.5], [0.0, 1.0]])  # (4, 2): ranks 0, 1, 2, 3
    sel = select_negatives(q, corpus, torch.tensor([0]), torch.tensor([1]), [{1}], num_negatives=3,
                           range_min=0, range_max=4, margin=0.0)
    # text 0 outscores the positive (text 1), so only texts 2 and 3 survive: two slots filled, one padded
    assert sel.negative_ids.tolist() == [[2, 3, -1]]
    assert torch.isnan(sel.negative_scores[0, 2]) and sel.negative_scores[0, 0] < sel.positive_scores[0]


def test_write_jsonl_is_atomic_and_reproducible(tmp_path):
    rows = [{"query": "perché è così", "positive": "città"}]
    for name in ("out.jsonl", "out.jsonl.gz"):
        write_jsonl(tmp_path / name, rows)
        first = (tmp_path / name).read_bytes()
        write_jsonl(tmp_path / name, rows)
        assert (tmp_path / name).read_bytes() == first
    assert gzip.decompress((tmp_path / "out.jsonl.gz").read_bytes()) == (tmp_path / "out.jsonl").read_bytes()
    assert "città" in (tmp_path / "out.jsonl").read_text(encoding="utf-8")  # ensure_ascii=False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "out.jsonl.gz"]  # no temp files left


# ================================================================================================ command line
def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "bertino.mine", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def input_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mine") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in italian_rows()), encoding="utf-8")
    return path


def test_cli_reruns_are_byte_identical_and_chunk_independent(tiny_model_dir, input_file, tmp_path):
    """Reruns (the second one from the embedding cache), any --chunk-size, .jsonl or .gz: the same bytes; the rows
    those of the in-memory miner, negatives as one `hard_negatives` list (or flat columns)."""
    extra = tmp_path / "extra.jsonl.gz"
    with gzip.open(extra, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "il sole sul mare di roma"}) + "\n" + json.dumps({"positive": "una cella"}) + "\n")
    settings = dict(range_min=3, range_max=20, margin=0.002, batch_size=4)
    common = ["--model", str(tiny_model_dir), "--input", str(input_file), "--corpus", str(extra),
              "--range-min", "3", "--range-max", "20", "--margin", "0.002", "--batch-size", "4",
              "--cache-dir", str(tmp_path / "cache")]
    outputs = {}
    for name, chunk in [("a.jsonl", "50000"), ("b.jsonl", "5"), ("a.jsonl.gz", "50000"), ("b.jsonl.gz", "3")]:
        proc = run_cli(*common, "--output", str(tmp_path / name), "--chunk-size", chunk)
        assert proc.returncode == 0, proc.stderr
        assert ("Encoding" in proc.stderr) == (name == "a.jsonl") and "Scoring" in proc.stderr  # the progress bars
        assert f"mined {len(italian_rows())} rows" in proc.stdout and "dropped" in proc.stdout
        outputs[name] = (tmp_path / name).read_bytes()
    assert outputs["a.jsonl"] == outputs["b.jsonl"]
    assert outputs["a.jsonl.gz"] == outputs["b.jsonl.gz"]
    assert gzip.decompress(outputs["a.jsonl.gz"]) == outputs["a.jsonl"]
    rows = [json.loads(line) for line in outputs["a.jsonl"].decode("utf-8").splitlines()]
    assert rows and all(list(r) == ["query", "positive", "hard_negatives"] for r in rows)
    expected = mine(SentenceEncoder.from_pretrained(tiny_model_dir), italian_rows(),
                    corpus=["il sole sul mare di roma", "una cella"], **settings)
    assert [{"query": r["query"], "positive": r["positive"], "negative_1": r["hard_negatives"][0],
             "negative_2": r["hard_negatives"][1]} for r in rows] == expected
    assert run_cli(*common, "--output", str(tmp_path / "flat.jsonl"), "--flat-columns").returncode == 0
    assert [json.loads(line) for line in (tmp_path / "flat.jsonl").read_text().splitlines()] == expected
    assert load_corpus(extra).text_rows() == [("il sole sul mare di roma",), ("una cella",)]


def test_cli_custom_columns(tiny_model_dir, tmp_path):
    src = tmp_path / "anchors.jsonl"
    src.write_text("".join(json.dumps({"anchor": r["query"], "text": r["positive"]}) + "\n" for r in italian_rows()))
    code = run(["--model", str(tiny_model_dir), "--input", str(src), "--output", str(tmp_path / "o.jsonl"),
                "--query-column", "anchor", "--positive-column", "text", "--range-min", "1", "--range-max", "30",
                "--max-score", "1.0", "--no-progress", "--cache-dir", str(tmp_path / "cache")])
    assert code == 0
    rows = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert len(rows) == len(italian_rows()) and set(rows[0]) == {"query", "positive", "hard_negatives"}


def bad_inputs(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """name → (extra CLI args, a fragment of the expected message)."""
    good = json.dumps({"query": "q", "positive": "p"})
    files = {
        "empty.jsonl": "\n",
        "malformed.jsonl": good + "\n{not json\n",
        "missing.jsonl": good + "\n" + json.dumps({"query": "q2"}) + "\n",
        "number.jsonl": good + "\n" + good + "\n" + json.dumps({"query": "q3", "positive": 7}) + "\n",
    }
    for name, text in files.items():
        (tmp / name).write_text(text, encoding="utf-8")
    return {
        "no file": (["--input", str(tmp / "nope.jsonl")], "nope.jsonl: no such file"),
        "empty": (["--input", str(tmp / "empty.jsonl")], "has no rows"),
        "malformed": (["--input", str(tmp / "malformed.jsonl")], "malformed.jsonl:2: invalid JSON"),
        "missing column": (["--input", str(tmp / "missing.jsonl")], "missing.jsonl:2: missing column 'positive'"),
        "not a string": (["--input", str(tmp / "number.jsonl")],
                         "number.jsonl:3: column 'positive': expected a non-empty string, found 7"),
        "no csv": (["--input", str(tmp / "x.csv")], "x.csv: no such file or folder"),
        "output type": (["--output", str(tmp / "o.csv")], "expected a .jsonl, .jsonl.gz or .parquet file"),
        "relative margin": (["--relative-margin", "1.5"], "relative_margin must be in [0, 1)"),
        "window": (["--range-min", "20", "--range-max", "10"], "is empty"),
        "k": (["--num-negatives", "0"], "num_negatives must be an integer >= 1"),
        "small window": (["--num-negatives", "5", "--range-min", "10", "--range-max", "12"], "holds 2 candidates"),
        "both caps": (["--margin", "0.1", "--max-score", "0.9"], "not allowed with argument"),
        "no model": (["--model", str(tmp / "no_model")], "no_model"),
        "bad corpus": (["--corpus", str(tmp / "missing.jsonl")], "missing.jsonl:2: missing column 'text'"),
        "output folder": (["--output", str(tmp / "a_file" / "o.jsonl")], "cannot create folder"),
        # these were tracebacks (OverflowError, RuntimeError, AssertionError), or silently ignored (0)
        "negative length": (["--max-seq-length", "-5"], "--max-seq-length must be >= 1 (tokens per text), got -5"),
        "zero length": (["--max-seq-length", "0"], "--max-seq-length must be >= 1 (tokens per text), got 0"),
        "no such device": (["--device", "xyz"], "--device xyz: not a torch device"),
        "missing gpu": (["--device", "cuda:99"], "--device cuda:99: this machine has"),
        "negative seed": (["--sampling", "random", "--seed", "-1"], "--seed must be >= 0, got -1"),
    }


def test_cli_errors_are_one_line(tiny_model_dir, input_file, tmp_path, capsys):
    (tmp_path / "a_file").write_text("in the way of an output folder")
    for name, (args, fragment) in bad_inputs(tmp_path).items():
        argv = ["--model", str(tiny_model_dir), "--input", str(input_file), "--output", str(tmp_path / "o.jsonl"),
                "--cache-dir", str(tmp_path / "cache"), *args]
        assert run(argv) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and fragment in err, (name, err)
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize("case", ["malformed", "small window", "no model", "negative length"])
def test_cli_errors_in_a_subprocess(tiny_model_dir, input_file, tmp_path, case):
    args, fragment = bad_inputs(tmp_path)[case]
    proc = run_cli("--model", str(tiny_model_dir), "--input", str(input_file), "--output", str(tmp_path / "o.jsonl"),
                   "--cache-dir", str(tmp_path / "cache"), *args)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1 and fragment in proc.stderr


def test_a_zero_max_seq_length_is_refused_not_ignored(tiny_model_dir):
    from bertino import SentenceEncoder
    from bertino.errors import BertinoError

    with pytest.raises(BertinoError, match="max_seq_length must be >= 1"):
        SentenceEncoder.from_pretrained(tiny_model_dir, max_seq_length=0)
    assert SentenceEncoder.from_pretrained(tiny_model_dir, max_seq_length=5).max_seq_length == 5


# ================================================================================================ at scale
class CountingEncoder(LookupEncoder):
    """LookupEncoder that counts the texts it encodes (a text's vector never depends on its batch or chunk)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.encoded = 0
        self.model = torch.nn.Linear(2, 2)  # what model_fingerprint hashes: the same weights in every instance
        torch.nn.init.ones_(self.model.weight), torch.nn.init.zeros_(self.model.bias)
        self.tokenizer = type("T", (), {"get_vocab": lambda self: {"a": 0}})()
        self.max_seq_length, self.pooling, self.do_lower_case, self.normalize_output = 8, "mean", False, False

    def encode(self, texts, **kw):
        self.encoded += len(texts)
        return super().encode(texts, normalize=kw.get("normalize", False))


def rows_data(tmp_path, rows):
    from bertino.mine import load_rows

    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return load_rows(path)


def as_flat(plan_sel_stats_sources, rows):
    from bertino.mine import output_rows

    plan, sel, stats, sources = plan_sel_stats_sources
    return list(output_rows(rows, plan, sel, sources, flat=True)), stats


@pytest.mark.parametrize("settings", [
    dict(num_negatives=2, range_min=10, range_max=50, margin=0.05),
    dict(num_negatives=3, range_min=0, range_max=8, margin=None, relative_margin=0.0),
    dict(num_negatives=2, range_min=2, range_max=30, margin=0.01, relative_margin=0.1, sampling="random", seed=3),
])
def test_the_scalable_miner_gives_the_in_memory_miners_rows(tmp_path, settings):
    """Distinct texts by hashes, a chunked embedding cache, memory-mapped matrices, exact or FAISS search: the same
    rows as `mine_with_stats` (the rule in plain tensors) for every chunking, with repeated queries, a query that is a
    corpus text and extra corpus texts."""
    from bertino.mine import load_corpus, mine_source

    rows = italian_rows() + [{"query": "il gatto 0 è nella pagina del cane", "positive": "il cane 1 dorme"}]
    data = rows_data(tmp_path, rows)
    (tmp_path / "extra.jsonl").write_text(json.dumps({"text": "dove è il gatto"}) + "\n"
                                          + json.dumps({"text": "il sole sul mare"}) + "\n")
    corpus = load_corpus(tmp_path / "extra.jsonl")
    expected, expected_stats = mine_with_stats(LookupEncoder(), rows, corpus=["dove è il gatto", "il sole sul mare"],
                                               **settings)
    for i, (encode_chunk, chunk_size, search) in enumerate([(1000, 50_000, "exact"), (7, 5, "exact"),
                                                            (3, 4, "auto")]):
        got, stats = as_flat(mine_source(CountingEncoder(), data, [corpus], cache_dir=tmp_path / f"cache{i}",
                                         encode_chunk=encode_chunk, chunk_size=chunk_size, search=search, **settings),
                             data)
        assert got == expected and stats == expected_stats, (encode_chunk, chunk_size, search)


def test_a_killed_run_resumes_without_encoding_its_finished_chunks(tmp_path):
    """Stopped after 3 chunks (as a kill would), the rerun encodes only the others; a third run (same model and
    texts) encodes nothing; the result is the uninterrupted run's."""
    from bertino.mine import mine_source

    data = rows_data(tmp_path, italian_rows())
    common = dict(cache_dir=tmp_path / "cache", encode_chunk=4, range_min=3, range_max=20)
    first = CountingEncoder()
    with pytest.raises(KeyboardInterrupt):
        mine_source(first, data, stop_after=3, **common)
    assert first.encoded == 12 and len(list((tmp_path / "cache").rglob("chunk-*.npy"))) == 3
    second = CountingEncoder()
    resumed = as_flat(mine_source(second, data, **common), data)
    n_texts = len({r["query"] for r in italian_rows()} | {r["positive"] for r in italian_rows()})
    assert second.encoded == n_texts - 12
    third = CountingEncoder()
    assert as_flat(mine_source(third, data, **common), data) == resumed and third.encoded == 0
    fresh = as_flat(mine_source(CountingEncoder(), data, **{**common, "cache_dir": tmp_path / "other"}), data)
    assert resumed == fresh and not list((tmp_path / "cache").rglob(".tmp-*"))


def test_the_demo_data_gets_the_in_memory_miners_negatives(tiny_model_dir, tmp_path):
    """The demo's 1701 Italian pairs, a real (tiny) encoder: the scalable path writes exactly the negatives of the
    in-memory miner (the one configs/demo.json's data was made with)."""
    from bertino.mine import load_rows, mine_source

    encoder = SentenceEncoder.from_pretrained(tiny_model_dir, max_seq_length=16)
    encode, calls = encoder.encode, {}  # both miners make the same single encode call: it is made once

    def encode_once(texts, **kw):
        key = (tuple(texts), tuple(sorted(kw.items())))
        if key not in calls:
            calls[key] = encode(texts, **kw)
        return calls[key]

    encoder.encode = encode_once
    data = load_rows(ROOT / "data" / "demo" / "train.jsonl.gz")
    rows = [{"query": q, "positive": p} for q, p in data.text_rows()]
    expected, stats = mine_with_stats(encoder, rows, range_min=10, range_max=50, margin=0.0, batch_size=64)
    got, got_stats = as_flat(mine_source(encoder, data, cache_dir=tmp_path / "cache", range_min=10, range_max=50,
                                         margin=0.0, batch_size=64), data)
    assert got == expected and got_stats == stats and 0 < stats.rows_out < stats.rows_in
    assert len(calls) == 1  # one chunk of all 3,402 texts, in the in-memory miner's order


def test_relative_margin_is_nv_retrievers_rule():
    """A negative survives the relative margin r iff cos(q, c) ≤ (1 − r)·cos(q, p): checked against the literal
    ranking, with the absolute margin off and on."""
    enc, rows = LookupEncoder(), italian_rows()
    corpus = list(dict.fromkeys(r["positive"] for r in rows))
    queries = list(dict.fromkeys(r["query"] for r in rows))
    scores = cosine_matrix(enc, queries, corpus)
    for margin, r in ((None, 0.05), (None, 0.3), (0.02, 0.1)):
        got = mine(enc, rows, num_negatives=2, range_min=0, range_max=len(corpus), margin=margin, relative_margin=r)
        assert got
        for row in got:
            s = scores[queries.index(row["query"])]
            pos = float(s[corpus.index(row["positive"])])
            for t in (row["negative_1"], row["negative_2"]):
                neg = float(s[corpus.index(t)])
                assert neg <= pos * (1 - r) and (margin is None or neg < pos - margin)
        assert got == brute_force(enc, rows, k=2, range_min=0, range_max=len(corpus), margin=margin,
                                  relative_margin=r)
        assert got != mine(enc, rows, num_negatives=2, range_min=0, range_max=len(corpus), margin=margin)


def test_faiss_candidates_rescored_give_the_exact_top_k():
    """FAISS float32 candidates, re-scored and checked: the exact top k, ties by corpus id — also when FAISS's own
    order is useless (many exact ties; no slack, so the exact fallback must take over)."""
    pytest.importorskip("faiss")
    from bertino import corpus_search

    g = torch.Generator().manual_seed(0)
    corpus = torch.randn(300, 16, generator=g)
    corpus[100:140] = corpus[5]  # 41 identical rows: ties across FAISS's cut
    queries = torch.cat([torch.randn(20, 16, generator=g), corpus[5:6] + 1e-3])
    exact = corpus_search.corpus_top_k(queries, corpus, 12, 64, "exact")
    assert all(torch.equal(a, b) for a, b in zip(corpus_search.corpus_top_k(queries, corpus, 12, 64, "faiss"), exact))
    saved = corpus_search.FAISS_SLACK
    try:
        corpus_search.FAISS_SLACK = 0
        got = corpus_search.corpus_top_k(queries, corpus, 12, 64, "faiss")
    finally:
        corpus_search.FAISS_SLACK = saved
    assert all(torch.equal(a, b) for a, b in zip(got, exact))


def test_two_processes_encode_a_share_each_and_write_what_one_process_writes(tiny_model_dir, input_file, tmp_path):
    """torchrun --nproc_per_node=2: each rank encodes every other chunk into the shared cache, rank 0 searches and
    writes; the output is the one-process output."""
    common = ["--model", str(tiny_model_dir), "--input", str(input_file), "--range-min", "3", "--range-max", "20",
              "--margin", "0.002", "--batch-size", "4", "--encode-chunk", "8", "--no-progress"]
    assert run([*common, "--cache-dir", str(tmp_path / "one"), "--output", str(tmp_path / "one.jsonl")]) == 0
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "bertino.mine", *common, "--cache-dir", str(tmp_path / "two"), "--output",
                           str(tmp_path / "two.jsonl")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "two.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()
    assert proc.stdout.count("mined ") == 1  # rank 0 writes
