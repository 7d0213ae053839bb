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
