"""benchmarks/gpu_table.py runs end to end on the CPU with tiny shapes (``--cpu-smoke``): the
files are written, every system row is present and the exactness checks pass. Its figures are
not checked; the real table needs a GPU (docs/speed.md, "GPU table")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SYSTEMS = ["base", "naive", "overlap", "naive-shared", "stacked", "speculative"]
COMPUTED = [f"speculative@{a} (computed)" for a in ("0", "0.5", "0.7", "0.9")]


def run_table(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_table.py"), "--out", str(out)]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [*cmd, *extra], capture_output=True, text=True, timeout=300, env=env, check=False
    )


def test_gpu_table_cpu_smoke(tmp_path):
    done = run_table(
        tmp_path,
        "--cpu-smoke",
        "--batch-sizes", "1", "2",
        "--max-new-tokens", "3",
        "--prompt-tokens", "6",
        "--k", "2",
        "--reps", "1",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = (tmp_path / "table.md").read_text()
    report = json.loads((tmp_path / "results.json").read_text())
    assert "not measured decoding" in table and "versions:" in table
    (entry,) = report["sets"]
    try:
        import bitsandbytes  # noqa: F401

        quantized = ["naive-bnb8", "naive-bnb4"]
    except ImportError:
        quantized = []
        assert any(s["what"] == "naive-bnb8" for s in entry["skipped"])
    for batch in (1, 2):
        rows = {r["system"]: r for r in entry["results"] if r["batch"] == batch}
        assert list(rows) == [*SYSTEMS, *quantized, *COMPUTED]
        for name in [*SYSTEMS, *quantized]:
            assert rows[name]["tokens"] == batch * 3 and rows[name]["tok_s"] > 0
            assert f"| {name} | " in table
        assert all(rows[name]["computed"] and rows[name]["tok_s"] > 0 for name in COMPUTED)
    checks = entry["checks"]
    assert len(checks) == 2 * 3 and all(c["pass"] for c in checks), checks
    assert {c["check"] for c in checks} == {
        "overlap = naive",
        "speculative = naive",
        "stacked = naive-shared",
    }
    assert [c["batch"] for c in entry["costs"]] == [1, 2]
    assert sorted(int(w) for w in entry["costs"][0]["verify"]) == [1, 2, 3]


def test_gpu_table_without_cuda_exits_2(tmp_path):
    import torch

    if torch.cuda.is_available():
        return  # the real run: not a unit test
    done = run_table(tmp_path)
    assert done.returncode == 2
    assert done.stdout.strip().splitlines() == [
        "gpu_table: no CUDA device (pass --cpu-smoke for the tiny CPU check)"
    ]
