"""Task data: every format loads the same rows, every bad row is a DataError naming file, line/row and key."""

import gzip
import json
import tempfile
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bertino.errors import ConfigError, DataError
from bertino.plumbing.config import NegativesConfig, TaskConfig, apply_overrides, config_from_dict
from bertino.plumbing.data import TaskData, balance_indices, balance_tasks, load_task, load_tasks

RETRIEVAL_COLUMNS = ("query", "positive", "negative_1", "negative_2")
RETRIEVAL_ROWS = [
    {"query": f"domanda {i}", "positive": f"risposta {i}", "negative_1": f"altro {i}", "negative_2": f"nulla {i}",
     "id": i}
    for i in range(5)
]
STS_ROWS = [{"sentence1": f"frase {i}", "sentence2": f"testo {i}", "score": float(i)} for i in range(6)]


def retrieval(dataset, **kw) -> TaskConfig:
    return TaskConfig(dataset=str(dataset), columns=RETRIEVAL_COLUMNS, loss="cached_mnrl", **kw)


def sts(dataset, loss="cosent", score_scale=5.0, **kw) -> TaskConfig:
    return TaskConfig(dataset=str(dataset), columns=("sentence1", "sentence2", "score"), loss=loss,
                      score_scale=score_scale, **kw)


def write_jsonl(path: Path, rows, blank_lines_after=()) -> Path:
    lines = []
    for i, row in enumerate(rows):
        lines.append(row if isinstance(row, str) else json.dumps(row))
        if i in blank_lines_after:
            lines.append("")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def load_error(task: TaskConfig, name: str = "t") -> str:
    with pytest.raises(DataError) as info:
        load_task(task, name)
    return str(info.value)


# ── formats ──────────────────────────────────────────────────────────────────────────────────────────────────

def expected_retrieval_texts():
    return [tuple(r[c] for c in RETRIEVAL_COLUMNS) for r in RETRIEVAL_ROWS]


def test_jsonl_retrieval(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", RETRIEVAL_ROWS, blank_lines_after=(1,))
    data = load_task(retrieval(path), "retrieval")
    assert isinstance(data, TaskData) and data.name == "retrieval" and len(data) == 5
    assert data.columns == RETRIEVAL_COLUMNS and data.scores is None and data.score_column is None
    assert data.text_rows() == expected_retrieval_texts()
    assert data.row_ref(0) == f"{path}:1"
    assert data.row_ref(2) == f"{path}:4"  # a blank line after row 1 shifts the line numbers


def test_utf8_bom_and_crlf(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(json.dumps(r).encode() for r in RETRIEVAL_ROWS) + b"\r\n")
    assert load_task(retrieval(path), "r").text_rows() == expected_retrieval_texts()


def test_jsonl_sts_scores_are_scaled_float32(tmp_path):
    data = load_task(sts(write_jsonl(tmp_path / "sts.jsonl", STS_ROWS)), "sts")
    assert data.text_rows() == [(r["sentence1"], r["sentence2"]) for r in STS_ROWS]
    assert data.columns == ("sentence1", "sentence2") and data.score_column == "score"  # columns ↔ texts
    assert data.scores.dtype == np.float32
    np.testing.assert_allclose(data.scores, np.arange(6) / 5.0, rtol=1e-6)


def test_jsonl_gz(tmp_path):
    path = tmp_path / "train.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(r) for r in RETRIEVAL_ROWS))
    assert load_task(retrieval(path), "r").text_rows() == expected_retrieval_texts()


def test_json_list_and_json_lines(tmp_path):
    as_list = tmp_path / "list.json"
    as_list.write_text(json.dumps(RETRIEVAL_ROWS, indent=2))
    data = load_task(retrieval(as_list), "r")
    assert data.text_rows() == expected_retrieval_texts() and data.row_ref(3) == f"{as_list} row 3"
    as_lines = write_jsonl(tmp_path / "lines.json", RETRIEVAL_ROWS)
    data = load_task(retrieval(as_lines), "r")
    assert data.text_rows() == expected_retrieval_texts() and data.row_ref(3) == f"{as_lines}:4"


def test_csv(tmp_path):
    path = tmp_path / "sts.csv"
    path.write_text("sentence1,sentence2,score\n" + "".join(
        f"\"{r['sentence1']}, ok\",{r['sentence2']},{r['score']}\n" for r in STS_ROWS))
    data = load_task(sts(path), "sts")
    assert data.text_rows()[2] == ("frase 2, ok", "testo 2")
    np.testing.assert_allclose(data.scores, np.arange(6) / 5.0, rtol=1e-6)
    assert data.row_ref(2) == f"{path} row 2"


def test_parquet(tmp_path):
    path = tmp_path / "train.parquet"
    datasets.Dataset.from_list(RETRIEVAL_ROWS).to_parquet(str(path))
    assert load_task(retrieval(path), "r").text_rows() == expected_retrieval_texts()


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    datasets.Dataset.from_list(RETRIEVAL_ROWS).save_to_disk(str(tmp_path / "plain"))
    assert load_task(retrieval(tmp_path / "plain"), "r").text_rows() == expected_retrieval_texts()

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(STS_ROWS),
                               "dev": datasets.Dataset.from_list(STS_ROWS[:2])})
    dd.save_to_disk(str(tmp_path / "dict"))
    assert len(load_task(sts(tmp_path / "dict"), "sts")) == 6
    assert len(load_task(sts(tmp_path / "dict", split="dev"), "sts")) == 2
    msg = load_error(sts(tmp_path / "dict", split="test"))
    assert "no split 'test'" in msg and "train, dev" in msg


def test_save_to_disk_with_format_still_gives_python_values(tmp_path):
    ds = datasets.Dataset.from_list(STS_ROWS).with_format("numpy")
    ds.save_to_disk(str(tmp_path / "np"))
    data = load_task(sts(tmp_path / "np"), "sts")
    assert data.text_rows()[0] == ("frase 0", "testo 0") and data.scores[5] == pytest.approx(1.0)


def test_base_dir(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", RETRIEVAL_ROWS)
    assert len(load_task(retrieval("train.jsonl"), "r", base_dir=tmp_path)) == 5


def test_hub_id_goes_through_load_dataset(monkeypatch):
    """A hub id: its snapshot through the hub cache (huggingface_hub), then datasets reads that folder."""
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, repo_type=None: f"/hub-cache/{repo_id}/{repo_type}")

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return datasets.Dataset.from_list([{"sentence1": "a", "sentence2": "b", "score": 6.0}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    task = TaskConfig(dataset="stsb_multi_mt", config="it", columns=("sentence1", "sentence2", "score"),
                      loss="cosine", score_scale=5.0)
    msg = load_error(task, "sts")  # 6 / 5 > 1: the cosine loss needs [0, 1]
    assert calls == [("/hub-cache/stsb_multi_mt/dataset", "it", "train")]
    assert "dataset stsb_multi_mt row 0" in msg and "'score'" in msg and "score_scale" in msg


def test_unreachable_hub_id(monkeypatch, tmp_path):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise ConnectionError("no internet")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    msg = load_error(TaskConfig(dataset="someone/missing", columns=("a", "b"), loss="mnrl"))
    assert "neither a local file or folder" in msg and "nor reachable on the Hugging Face hub" in msg
    assert "ConnectionError: no internet" in msg


def test_missing_local_file_and_unsupported_type(tmp_path):
    msg = load_error(retrieval(tmp_path / "nope.jsonl"))
    assert "no such file or folder" in msg and "nope.jsonl" in msg
    assert "no such file" in load_error(retrieval("./relative/thing"))
    (tmp_path / "data.txt").write_text("hello\n")
    msg = load_error(retrieval(tmp_path / "data.txt"))
    assert "unsupported file type" in msg and ".jsonl" in msg and ".parquet" in msg
    (tmp_path / "folder").mkdir()
    assert "not one written by datasets' save_to_disk" in load_error(retrieval(tmp_path / "folder"))


# ── every bad row names where it is ──────────────────────────────────────────────────────────────────────────

def retrieval_row(**changes):
    row = {"query": "q", "positive": "p", "negative_1": "n1", "negative_2": "n2"}
    row.update(changes)
    return {k: v for k, v in row.items() if v is not ...}


def sts_row(**changes):
    row = {"sentence1": "a", "sentence2": "b", "score": 2.5}
    row.update(changes)
    return {k: v for k, v in row.items() if v is not ...}


@pytest.mark.parametrize("bad, fragments", [
    ('{"query": "q", "positive": ', [":3: invalid JSON: Expecting value (column 28)"]),
    ("not json", [":3: invalid JSON: Expecting value (column 1)"]),
    ('["q", "p", "n1", "n2"]', [":3: expected a JSON object, found list ['q', 'p', 'n1', 'n2']"]),
    ('"just a string"', [":3: expected a JSON object, found str 'just a string'"]),
    ("42", [":3: expected a JSON object, found int 42"]),
    (retrieval_row(negative_2=...), [":3: missing column 'negative_2'",
                                     "the row has keys: query, positive, negative_1"]),
    (retrieval_row(query=""), [":3: column 'query': expected a non-empty string, found ''"]),
    (retrieval_row(positive="   \n"), [":3: column 'positive': expected a non-empty string"]),
    (retrieval_row(negative_1=None), [":3: column 'negative_1'", "found None"]),
    (retrieval_row(negative_1=7), [":3: column 'negative_1'", "found 7"]),
    (retrieval_row(negative_2=["x"]), [":3: column 'negative_2'", "found ['x']"]),
    (retrieval_row(negative_2="p"), [":3: column 'negative_2' equals column 'positive'"]),
    (retrieval_row(negative_1=" p "), [":3: column 'negative_1' equals column 'positive'"]),
    (retrieval_row(negative_1="q"), [":3: column 'negative_1' equals column 'query'"]),
])
def test_bad_retrieval_rows(tmp_path, bad, fragments):
    path = write_jsonl(tmp_path / "train.jsonl", [retrieval_row(), retrieval_row(query="q2")], blank_lines_after=())
    path.write_text(path.read_text() + (bad if isinstance(bad, str) else json.dumps(bad)) + "\n")
    msg = load_error(retrieval(path), "retrieval")
    assert msg.startswith("task 'retrieval': ") or msg.startswith(str(path))
    assert f"{path}:3: " in msg, msg  # FILE:LINE, the line of the bad row
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)


@pytest.mark.parametrize("bad, loss, fragments", [
    ('{"sentence1": "a", "sentence2": "b", "score": NaN}', "cosent", ["column 'score'", "finite", "nan"]),
    ('{"sentence1": "a", "sentence2": "b", "score": Infinity}', "cosent", ["column 'score'", "finite", "inf"]),
    ('{"sentence1": "a", "sentence2": "b", "score": ' + "9" * 400 + "}", "cosent", ["column 'score'", "finite"]),
    (sts_row(score="3.5"), "cosent", ["column 'score': expected a number, found '3.5'"]),
    (sts_row(score=True), "cosent", ["column 'score': expected a number, found True"]),
    (sts_row(score=None), "cosent", ["column 'score': expected a number, found None"]),
    (sts_row(score=...), "cosent", ["missing column 'score'", "the row has keys: sentence1, sentence2"]),
    (sts_row(sentence2=""), "cosent", ["column 'sentence2': expected a non-empty string"]),
    (sts_row(score=5.5), "cosine", ["column 'score'", "[0, 1]", "5.5", "score_scale"]),
    (sts_row(score=-0.1), "cosine", ["column 'score'", "[0, 1]"]),
])
def test_bad_sts_rows(tmp_path, bad, loss, fragments):
    path = tmp_path / "sts.jsonl"
    path.write_text(json.dumps(sts_row()) + "\n\n" + (bad if isinstance(bad, str) else json.dumps(bad)) + "\n")
    msg = load_error(sts(path, loss=loss), "sts")
    assert f"{path}:3: " in msg, msg
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)


def test_cosent_accepts_scores_outside_unit_interval(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", [sts_row(score=4.0), sts_row(score=-3)])
    np.testing.assert_allclose(load_task(sts(path, score_scale=1.0), "s").scores, [4.0, -3.0])


def test_score_overflowing_float32(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", [sts_row(score=1e39)])
    assert "does not fit in float32" in load_error(sts(path, score_scale=1.0))


@pytest.mark.parametrize("content", ["", "\n\n  \n", "[]"])
def test_empty_dataset(tmp_path, content):
    path = tmp_path / ("empty.json" if content == "[]" else "empty.jsonl")
    path.write_text(content)
    assert "has no rows" in load_error(retrieval(path), "r")


def test_empty_parquet(tmp_path):
    path = tmp_path / "empty.parquet"
    datasets.Dataset.from_dict({c: [] for c in RETRIEVAL_COLUMNS},
                               features=datasets.Features({c: datasets.Value("string") for c in RETRIEVAL_COLUMNS})
                               ).to_parquet(str(path))
    assert "has no rows" in load_error(retrieval(path))


def test_json_list_errors(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n {"query": "q"},\n {"query": }\n]')
    msg = load_error(retrieval(path))
    assert msg.startswith(f"{path}:3:") and "invalid JSON" in msg, msg  # FILE:LINE:COL of the document
    path.write_text(json.dumps([retrieval_row(), retrieval_row(negative_1=...)]))
    assert f"{path} row 1: missing column 'negative_1'" in load_error(retrieval(path))


def test_columnar_errors_name_the_row(tmp_path):
    path = tmp_path / "sts.parquet"
    rows = [sts_row(), sts_row(score=float("nan")), sts_row()]
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    assert f"{path} row 1: column 'score': expected a finite number" in load_error(sts(path))

    csv = tmp_path / "r.csv"
    csv.write_text("query,positive\nq,p\n")
    msg = load_error(retrieval(csv))
    assert "missing column 'negative_1'" in msg and "columns are: query, positive" in msg

    csv.write_text("query,positive,negative_1,negative_2\nq,p,n,m\nq2,,n,m\n")  # empty cell → None
    assert f"{csv} row 1: column 'positive': expected a non-empty string" in load_error(retrieval(csv))


def test_unreadable_bytes(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(retrieval_row()).encode() + b"\n" + b'{"query": "caf\xe9"}\n')
    assert f"{path}:2: not UTF-8 text" in load_error(retrieval(path))
    gz = tmp_path / "broken.jsonl.gz"
    gz.write_bytes(b"this is not gzip")
    assert f"{gz}: cannot read" in load_error(retrieval(gz))


# ── balance_to ───────────────────────────────────────────────────────────────────────────────────────────────

def fake_task(name: str, n: int, with_scores: bool = False) -> TaskData:
    data = TaskData.from_rows(name, ("a", "b"), [(f"{name} a{i}", f"{name} b{i}") for i in range(n)],
                              scores=np.arange(n, dtype=np.float32) if with_scores else None,
                              source=f"{name}.jsonl", lines=np.arange(1, n + 1) * 2)
    data.score_column = "s" if with_scores else None
    return data


CFGS = {"retrieval": TaskConfig(dataset="r", columns=("a", "b"), loss="mnrl"),
        "sts": TaskConfig(dataset="s", columns=("a", "b", "s"), loss="cosent", balance_to="retrieval")}


@pytest.mark.parametrize("m, n", [(10, 4), (4, 10), (3, 9), (7, 7), (1, 5), (5, 1)])
def test_balance_indices_counts(m, n):
    idx = balance_indices(m, n, np.random.default_rng(0))
    assert idx.shape == (n,) and idx.dtype == np.int64
    counts = np.bincount(idx, minlength=m)
    assert counts.min() >= n // m and counts.max() <= n // m + 1  # every row floor(n/m) or floor(n/m)+1 times
    if n <= m:
        assert len(set(idx.tolist())) == n and list(idx) == sorted(idx)  # subset without replacement, in order
    else:
        assert list(idx[:m]) == list(range(m))


@pytest.mark.parametrize("n_sts, n_retrieval", [(20, 7), (7, 20), (7, 7)])
def test_balance_tasks(n_sts, n_retrieval):
    tasks = {"retrieval": fake_task("retrieval", n_retrieval), "sts": fake_task("sts", n_sts, with_scores=True)}
    out = balance_tasks(tasks, CFGS, seed=42)
    assert out["retrieval"] is tasks["retrieval"]
    assert len(out["sts"]) == n_retrieval and out["sts"].scores.shape == (n_retrieval,)
    counts = Counter(out["sts"].text_rows())
    assert set(counts) <= set(tasks["sts"].text_rows())
    assert max(counts.values()) - min(counts.values()) <= 1
    for i, text in enumerate(out["sts"].text_rows()):  # scores and row references travel with their rows
        j = tasks["sts"].text_rows().index(text)
        assert out["sts"].scores[i] == tasks["sts"].scores[j]
        assert out["sts"].row_ref(i) == f"sts.jsonl:{2 * (j + 1)}"
    assert out["sts"].columns == ("a", "b") and out["sts"].score_column == "s"
    assert len(tasks["sts"]) == n_sts  # input untouched

    again = balance_tasks(dict(reversed(list(tasks.items()))), CFGS, seed=42)  # dict order does not matter
    assert again["sts"].text_rows() == out["sts"].text_rows()
    if n_sts != n_retrieval:
        assert any(balance_tasks(tasks, CFGS, seed=s)["sts"].text_rows() != out["sts"].text_rows() for s in range(1, 5))


def test_balance_row_ref_without_line_numbers():
    task = TaskData.from_rows("sts", ("a", "b"), [("x", "y"), ("z", "w")], np.zeros(2, np.float32), "dataset hub/x")
    picked = task.select(np.array([1, 1, 0]))
    assert [picked.row_ref(i) for i in range(3)] == ["dataset hub/x row 1", "dataset hub/x row 1",
                                                      "dataset hub/x row 0"]
    assert picked.select(np.array([0])).row_ref(0) == "dataset hub/x row 1"


def test_balance_to_unloaded_task():
    with pytest.raises(ConfigError, match="task 'retrieval' was not loaded"):
        balance_tasks({"sts": fake_task("sts", 3)}, CFGS, seed=0)


def test_load_tasks_balances(tmp_path):
    write_jsonl(tmp_path / "r.jsonl", [retrieval_row(query=f"q{i}", positive=f"p{i}") for i in range(9)])
    write_jsonl(tmp_path / "s.jsonl", STS_ROWS[:4])
    cfg = config_from_dict(apply_overrides({"model": {"name_or_path": "x"}, "tasks": {
        "retrieval": {"dataset": "r.jsonl", "columns": list(RETRIEVAL_COLUMNS), "loss": "cached_mnrl"},
        "sts": {"dataset": "s.jsonl", "columns": ["sentence1", "sentence2", "score"], "loss": "cosent",
                "score_scale": 5, "balance_to": "retrieval"}}}, []))
    tasks = load_tasks(cfg, base_dir=tmp_path)
    assert len(tasks["retrieval"]) == 9 and len(tasks["sts"]) == 9
    assert tasks["sts"].text_rows()[:8] == [(r["sentence1"], r["sentence2"]) for r in STS_ROWS[:4]] * 2


# ── property: random rows give TaskData or DataError, never another exception ─────────────────────────────────

KEYS = ["query", "positive", "negative_1", "sentence1", "sentence2", "score", "other"]
GOOD_TEXT = st.text(min_size=1, max_size=8).filter(str.strip)
BAD = st.one_of(st.sampled_from(["", " ", "\n"]), st.none(), st.booleans(),
                st.integers(min_value=-(10**400), max_value=10**400), st.floats(allow_nan=True),
                st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=2), st.integers(), max_size=1))
GOOD = {"score": st.one_of(st.floats(0, 5), st.integers(0, 5)),
        "text": st.one_of(GOOD_TEXT, st.sampled_from(["a", "b", "a "]))}  # repeats → negative == positive


@st.composite
def random_row(draw):
    """Mostly objects with every key, each value good 90% of the time (so about half the files load); sometimes
    missing keys, a list instead of an object, or a line that is not JSON."""
    kind = draw(st.sampled_from(["object"] * 8 + ["list", "raw"]))
    if kind == "list":
        return draw(st.lists(st.text(max_size=3), max_size=2))
    if kind == "raw":
        return ("RAW", draw(st.text(max_size=10)))
    row = {}
    for key in KEYS:
        good = GOOD["score" if key == "score" else "text"]
        row[key] = draw(good if draw(st.integers(0, 9)) else BAD)
    if not draw(st.integers(0, 4)):
        for key in draw(st.lists(st.sampled_from(KEYS), min_size=1, max_size=2)):
            row.pop(key, None)
    return row


ROWS = random_row()
TASKS = st.sampled_from([
    TaskConfig(dataset="", columns=("query", "positive", "negative_1"), loss="mnrl"),
    TaskConfig(dataset="", columns=("query", "positive"), loss="cached_mnrl"),
    TaskConfig(dataset="", columns=("sentence1", "sentence2", "score"), loss="cosent", score_scale=5.0),
    TaskConfig(dataset="", columns=("sentence1", "sentence2", "score"), loss="cosine", score_scale=5.0),
])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(ROWS, max_size=4), task=TASKS, suffix=st.sampled_from([".jsonl", ".json"]))
def test_random_rows_load_or_raise_data_error(rows, task, suffix):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"data{suffix}"
        lines = [r[1].replace("\n", " ") if isinstance(r, tuple) else json.dumps(r) for r in rows]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass")
        task = TaskConfig(**{**task.__dict__, "dataset": str(path)})
        try:
            data = load_task(task, "t")
        except DataError as e:
            assert str(path) in str(e) or "task 't'" in str(e)
            return
    n_text = 2 if task.loss in ("cosent", "cosine") else len(task.columns)
    assert len(data.columns) == n_text and data.columns == task.columns[:n_text]
    assert len(data) >= 1 and all(len(t) == n_text for t in data.text_rows())
    assert all(type(s) is str and s.strip() for t in data.text_rows() for s in t)
    if task.loss in ("cosent", "cosine"):
        assert data.scores.dtype == np.float32 and data.scores.shape == (len(data),)
        assert np.isfinite(data.scores).all()
        if task.loss == "cosine":
            assert ((data.scores >= 0) & (data.scores <= 1)).all()
    else:
        assert data.scores is None
        for t in data.text_rows():
            assert all(neg.strip() not in (t[0].strip(), t[1].strip()) for neg in t[2:])
    for i in range(len(data)):
        assert str(path) in data.row_ref(i)


# ── issue 23: every bad row counted (14), decimal scores and lists in CSV (15), a hold-out too small (11) ─────────

def test_every_bad_row_is_counted_by_reason_and_the_first_few_are_named(tmp_path):
    """Eight bad rows of four kinds among good ones: ONE error gives the count, the count per reason, and the first
    five as FILE:LINE with what is wrong — no rerun per bad row."""
    lines = []
    for i in range(20):
        row = retrieval_row(query=f"q{i}", positive=f"p{i}", negative_1=f"a{i}", negative_2=f"b{i}")
        if i in (2, 5, 9):
            row["query"] = ""
        if i in (3, 12):
            row["negative_2"] = row["positive"]
        if i == 7:
            row = "{not json"
        if i in (15, 17):
            row.pop("negative_1")
        lines.append(row if isinstance(row, str) else json.dumps(row))
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    msg = load_error(retrieval(path), "retrieval")
    assert msg.startswith(f"task 'retrieval': 8 bad rows in {path}"), msg
    for count_and_reason in ("3 × column 'query': not a non-empty string",
                             "2 × column 'negative_2' equals column 'positive'", "1 × invalid JSON",
                             "2 × missing column 'negative_1'"):
        assert count_and_reason in msg, (count_and_reason, msg)
    named = [f"{path}:{line}: " for line in (3, 4, 6, 8, 10)]  # the first five bad rows, by line
    assert all(ref in msg for ref in named), msg
    assert f"{path}:13: " not in msg and "bad_rows" in msg and '"drop"' in msg
    assert f"{path}:3: column 'query': expected a non-empty string, found ''" in msg
    assert f"{path}:8: invalid JSON" in msg


def test_bad_rows_drop_trains_on_the_good_rows_and_counts_the_dropped(tmp_path):
    """tasks.NAME.bad_rows = "drop": the bad rows are left out, counted by reason, and the summary line says so."""
    from types import SimpleNamespace

    import train

    rows = [retrieval_row(query=f"q{i}", positive=f"p{i}", negative_1=f"a{i}", negative_2=f"b{i}") for i in range(9)]
    rows[1]["query"] = " "
    rows[4]["negative_1"] = rows[4]["query"]
    rows[6]["negative_2"] = 7
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    data = load_task(retrieval(path, bad_rows="drop"), "retrieval")
    assert [row[0] for row in data.text_rows()] == [f"q{i}" for i in (0, 2, 3, 5, 7, 8)]
    assert data.bad_rows == {"column 'query': not a non-empty string": 1,
                             "column 'negative_1' equals column 'query'": 1,
                             "column 'negative_2': not a non-empty string": 1}
    run = SimpleNamespace(tasks={"retrieval": data}, holdouts={}, steps_per_epoch=2, total_steps=2,
                          resume_from=None, dist_info=SimpleNamespace(world_size=1), device="cpu", amp_dtype=None)
    assert "retrieval 6 (3 dropped: bad rows)" in train.summary_line(run)
    sts_path = tmp_path / "sts.parquet"
    datasets.Dataset.from_list([sts_row(score=1.0), sts_row(score=float("nan")), sts_row(score=4.0)]).to_parquet(
        str(sts_path))
    scored = load_task(sts(sts_path, bad_rows="drop"), "sts")
    assert len(scored) == 2 and scored.bad_rows == {"column 'score': not a finite number": 1}
    np.testing.assert_allclose(scored.scores, [0.2, 0.8], rtol=1e-6)
    with pytest.raises(ConfigError, match="bad_rows"):
        config_from_dict({"model": {"name_or_path": "x"}, "tasks": {"r": {
            "dataset": "r.jsonl", "columns": ["a", "b"], "loss": "mnrl", "bad_rows": "skip"}}})


def test_parquet_decimal_scores_are_numbers(tmp_path):
    """A parquet score column of decimals (Decimal('0.45')) is read as the numbers they are."""
    from decimal import Decimal

    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "sts.parquet"
    pq.write_table(pa.table({"sentence1": ["a", "b", "c"], "sentence2": ["x", "y", "z"],
                             "score": pa.array([Decimal("0.45"), Decimal("4.50"), Decimal("2.00")],
                                               type=pa.decimal128(4, 2))}), path)
    data = load_task(sts(path), "sts")
    np.testing.assert_allclose(data.scores, np.array([0.45, 4.5, 2.0]) / 5.0, rtol=1e-6)


def test_listed_negatives_cannot_come_from_a_csv_file(tmp_path):
    """A CSV cell holds text, not a list: `negatives` with a CSV file says so, and what to use instead."""
    path = tmp_path / "r.csv"
    path.write_text('query,positive,hard_negatives\nq,p,"[""a"", ""b""]"\n')
    msg = load_error(TaskConfig(dataset=str(path), columns=("query", "positive"), loss="mnrl",
                                negatives=NegativesConfig("hard_negatives", 2)))
    assert "CSV" in msg and "cannot hold lists" in msg and "negative_1" in msg and str(path) in msg


def test_a_holdout_too_small_for_its_sts_set_names_the_key(tmp_path):
    """tasks.NAME.holdout that leaves one STS row out: the error names the key to change, not only the set."""
    from bertino.plumbing.data import load_run_data
    from bertino.plumbing.eval_data import load_eval_sets

    write_jsonl(tmp_path / "s.jsonl", STS_ROWS)
    cfg = config_from_dict({"model": {"name_or_path": "x"}, "tasks": {"sts": {
        "dataset": str(tmp_path / "s.jsonl"), "columns": ["sentence1", "sentence2", "score"], "loss": "cosent",
        "holdout": 0.1}}})
    holdouts = load_run_data(cfg).holdouts
    assert len(holdouts["sts"]) == 1
    with pytest.raises(DataError, match=r"tasks\.sts\.holdout") as info:
        load_eval_sets([], [], holdouts)
    assert "at least 2 rows" in str(info.value)
