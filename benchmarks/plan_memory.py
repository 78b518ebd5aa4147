"""Rank 0's data plan (clean, dedupe, split, mix, write the plan): peak memory as the dataset grows
1x and 16x. Aim: peak RSS at 16x over 1x <= 1.2 (data_plan.py streams through disk). With
--baseline-src (a tree extracted with `git archive <commit> trainer_image operator`), the same plan
by that tree's planner in the same run, as the baseline.

Each plan runs in a process of its own on chat records of about 1.5 KB (three sources, weights
that repeat one and subsample another, 2% duplicates); the process reports its own peak resident
set (ru_maxrss) and wall time. `--form json-array` writes each source as one indented JSON array
(Alpaca's and LLaMA-Factory's form: read item by item, never whole), at 16x about 480 MB.

    .venv/bin/python benchmarks/plan_memory.py [--records 20000] [--form json-array] [--baseline-src DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path
from typing import Any

from _common import REPO, print_table, run_in_tree

from tests.support.factories import job

# Run in the child: plans with whichever planner the tree on PYTHONPATH has.
CHILD = """
import json, resource, sys, time
from pathlib import Path
from finetune_trainer.config import load_config
config, out, files = load_config(Path(sys.argv[1])), Path(sys.argv[2]), json.loads(sys.argv[3])
files = {int(k): [Path(p) for p in v] for k, v in files.items()}
started = time.monotonic()
try:
    from finetune_trainer.data_plan import write_plan
    counts = write_plan(config, files, out).counts
except ImportError:  # the planner before data_plan.py: every record in memory
    from finetune_trainer.tokenization import plan_records, write_plan
    train, validation, _ = plan_records(config, files)
    write_plan(train, out / "train.jsonl"); write_plan(validation, out / "validation.jsonl")
    counts = {"train": len(train), "validation": len(validation)}
seconds = time.monotonic() - started
print(json.dumps({"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
                  "seconds": seconds, **counts}))
"""

WORDS = ["the", "of", "model", "train", "data", "token", "loss", "batch", "rank", "node", "step", "answer"]


def _write_sources(directory: Path, records: int, form: str) -> dict[int, list[Path]]:
    rng = random.Random(0)
    files = {}
    for index, share in enumerate((0.6, 0.3, 0.1)):
        path = directory / f"source{index}.{'json' if form == 'json-array' else 'jsonl'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as f:
            f.write("[\n" if form == "json-array" else "")
            for i in range(int(records * share)):
                row = i if rng.random() > 0.02 else max(0, i - 1)  # 2% repeat the row before
                text = " ".join(WORDS[(row * 7 + k) % len(WORDS)] for k in range(120))
                messages = [{"role": "user", "content": f"{index}-{row} {text}"},
                            {"role": "assistant", "content": f"{text} {row}"}]  # fmt: skip
                if form == "json-array":
                    f.write((",\n" if i else "") + json.dumps({"messages": messages}, indent=2))
                else:
                    f.write(json.dumps({"messages": messages}) + "\n")
            f.write("\n]\n" if form == "json-array" else "")
        files[index] = [path]
    return files


def _config(directory: Path, files: dict[int, list[Path]]) -> Path:
    from finetune_operator.api.trainer_config import resolve_trainer_config

    weights = (1, 2, 1)  # source 1 repeated, source 0 subsampled
    sources = [{"uri": f"file://{files[i][0]}", "shape": "chat", "weight": w} for i, w in enumerate(weights)]
    changes = {"spec.dataset.sources": sources, "spec.dataset.validationFraction": 0.05}
    config = resolve_trainer_config(job(changes))
    path = directory / "config.json"
    path.write_text(config.model_dump_json(by_alias=True, exclude_none=True))
    return path


def _plan(src: Path, directory: Path, files: dict[int, list[Path]], config: Path) -> dict[str, Any]:
    by_source = json.dumps({k: [str(p) for p in v] for k, v in files.items()})
    return run_in_tree(src, CHILD, str(config), str(directory / "plan"), by_source)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=20000)
    parser.add_argument("--form", choices=("jsonl", "json-array"), default="jsonl")
    parser.add_argument("--baseline-src", type=Path)
    args = parser.parse_args()
    trees = {"this tree": REPO, **({"baseline": args.baseline_src} if args.baseline_src else {})}
    results: dict[tuple[str, int], dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for factor in (1, 16):
            data = Path(tmp) / f"x{factor}"
            files = _write_sources(data / "sources", args.records * factor, args.form)
            config = _config(data, files)
            for name, src in trees.items():
                results[name, factor] = _plan(src, data / name.replace(" ", "-"), files, config)
    rows = [
        [name, f"{factor}x ({args.records * factor} records)", str(r["train"]), str(r["validation"]),
         str(r["peak"]), f"{r['seconds']:.1f}"]
        for (name, factor), r in results.items()
    ]  # fmt: skip
    columns = ["planner", "dataset", "train", "validation", "peak RSS (MiB)", "wall (s)"]
    print_table(f"Data plan on one rank: chat records of ~1.5 KB, 3 sources, {args.form}", columns, rows)
    for name in trees:
        print(f"ratio ({name}, peak RSS 16x / 1x): {results[name, 16]['peak'] / results[name, 1]['peak']:.3f}"
              + ("  (aim <= 1.2)" if name == "this tree" else ""))  # fmt: skip
    if args.baseline_src:
        ratio = results["this tree", 16]["peak"] / results["baseline", 16]["peak"]
        print(f"ratio (peak RSS at 16x, this tree / baseline): {ratio:.3f}")


if __name__ == "__main__":
    main()
