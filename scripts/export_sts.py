"""Write an STS split as the JSONL that `evaluate.py --sts` and `eval.sts` read: {"sentence1", "sentence2", "score"}.

    python scripts/export_sts.py --split dev --output data/sts/dev.jsonl      # stsb_multi_mt, Italian (needs the hub)
    python scripts/export_sts.py --dataset ./my_sts_folder --split test --output data/sts/test.jsonl

`--dataset` is a hub id (default PhilipMay/stsb_multi_mt, config `it`) or a `datasets.save_to_disk` folder.
Scores are written as they are (stsb_multi_mt: 0–5); Pearson and Spearman do not depend on the scale.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def export(dataset, output: Path, score_column: str = "similarity_score") -> int:
    """Rows of a `datasets.Dataset` → JSONL; returns the row count."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in dataset:
            f.write(json.dumps({"sentence1": row["sentence1"], "sentence2": row["sentence2"],
                                "score": float(row[score_column])}, ensure_ascii=False) + "\n")
    tmp.replace(output)
    return len(dataset)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="PhilipMay/stsb_multi_mt")
    p.add_argument("--config", default="it", help="dataset config (language) on the hub")
    p.add_argument("--split", default="dev")
    p.add_argument("--score-column", default="similarity_score")
    p.add_argument("--output", type=Path, required=True)
    args = p.parse_args(argv)
    import datasets

    if Path(args.dataset).is_dir():
        ds = datasets.load_from_disk(args.dataset)
        ds = ds[args.split] if isinstance(ds, datasets.DatasetDict) else ds
    else:
        try:
            ds = datasets.load_dataset(args.dataset, args.config, split=args.split)
        except Exception as e:  # offline, unknown id, unknown split: one clear line
            print(f"error: cannot load {args.dataset} ({args.config}, {args.split}): {str(e).splitlines()[0]}",
                  file=sys.stderr)
            return 2
    missing = {"sentence1", "sentence2", args.score_column} - set(ds.column_names)
    if missing:
        print(f"error: {args.dataset} has no column(s) {sorted(missing)}; found {ds.column_names}", file=sys.stderr)
        return 2
    n = export(ds, args.output, args.score_column)
    print(f"wrote {n} rows to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
