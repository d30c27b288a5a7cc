"""benchmarks/gpu_table.py runs end to end on the CPU with tiny shapes (``--cpu-smoke``): the
files are written, every system row is present and the exactness checks pass. Its figures are
not checked; the real table needs a GPU (docs/speed.md, "GPU table")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

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
    quantized = expected_quantized(entry, table)
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


def expected_quantized(entry: dict, table: str) -> list[str]:
    """The bitsandbytes rows this machine must produce. Without bitsandbytes: none (both
    listed as skipped). On a CPU where bitsandbytes repacks 4-bit weights (AVX-512 BF16),
    ``naive-bnb4`` may be skipped by proxytune's shape check, with that reason in the table;
    the test then says so (a warning in pytest's summary). Everywhere else: both rows."""
    from proxytune.backends.quantize import repacks_4bit_on_cpu

    skipped = {s["what"]: s["why"] for s in entry["skipped"]}
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        assert {"naive-bnb8", "naive-bnb4"} <= set(skipped), skipped
        return []
    why = skipped.get("naive-bnb4")
    if why is not None and repacks_4bit_on_cpu():
        assert "AVX-512 BF16" in why and f"- naive-bnb4: {why}" in table, why
        warnings.warn(f"naive-bnb4 skipped on this CPU, as it should be: {why}", stacklevel=2)
        return ["naive-bnb8"]
    return ["naive-bnb8", "naive-bnb4"]


def test_gpu_table_without_cuda_exits_2(tmp_path):
    import torch

    if torch.cuda.is_available():
        return  # the real run: not a unit test
    done = run_table(tmp_path)
    assert done.returncode == 2
    assert done.stdout.strip().splitlines() == [
        "gpu_table: no CUDA device (pass --cpu-smoke for the tiny CPU check)"
    ]


def test_only_a_cpu_that_repacks_4bit_weights_may_skip_the_bnb4_row(monkeypatch):
    pytest.importorskip("bitsandbytes")
    import proxytune.backends.quantize as quantize

    why = "ConfigError: quantize='bnb4' on this CPU (AVX-512 BF16): bitsandbytes repacks ..."
    entry = {"skipped": [{"what": "naive-bnb4", "why": why}]}
    table = f"Skipped:\n\n- naive-bnb4: {why}\n"
    monkeypatch.setattr(quantize, "repacks_4bit_on_cpu", lambda: True)  # AVX-512 BF16
    with pytest.warns(UserWarning, match="naive-bnb4 skipped on this CPU"):
        assert expected_quantized(entry, table) == ["naive-bnb8"]
    with pytest.raises(AssertionError):  # skipped for another reason: a failure
        expected_quantized({"skipped": [{"what": "naive-bnb4", "why": "OOM"}]}, table)
    monkeypatch.setattr(quantize, "repacks_4bit_on_cpu", lambda: False)  # AVX2: the row is due
    assert expected_quantized(entry, table) == ["naive-bnb8", "naive-bnb4"]
    assert expected_quantized({"skipped": []}, "") == ["naive-bnb8", "naive-bnb4"]
