"""The benchmark scripts run end to end (tiny models, a few tokens): their figures are not
checked here, only that every system runs and that exact systems agree with naive proxy-tuning."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def test_bench_speed_runs_every_kind_of_system(tmp_path, bnb_dirs):
    recipe = tmp_path / "tiny.yaml"  # models bitsandbytes' 4-bit CPU path takes (AVX-512 too)
    recipe.write_text(
        f"""
base: {{model: "{bnb_dirs["base"]}", prompt: raw}}
pairs:
  - expert: {{model: "{bnb_dirs["anti"]}", prompt: chat}}
    anti_expert: {{model: "{bnb_dirs["anti"]}", prompt: raw}}
model_defaults: {{device: cpu, dtype: float32}}
"""
    )
    out = tmp_path / "speed.json"
    systems = ["base", "naive", "overlap", "stacked", "speculative+overlap", "speculative-bnb4"]
    cmd = [sys.executable, str(BENCHMARKS / "bench_speed.py"), "--recipe", str(recipe)]
    cmd += ["--batch-sizes", "2", "--max-new-tokens", "6", "--threads", "1", "--markdown"]
    cmd += ["--systems", *systems, "--json", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| speculative+overlap | " in done.stdout and "overlap measured:" in done.stdout
    results = {r["system"]: r for r in json.loads(out.read_text())["results"]}
    assert list(results) == systems
    assert all(r["tokens"] == 2 * 6 for r in results.values())
    for exact in ("overlap", "stacked", "speculative+overlap"):
        assert results[exact]["ids"] == results["naive"]["ids"]
    assert results["speculative+overlap"]["acceptance"] is not None


def test_bench_api_base_prints_its_tables_and_the_id_path_is_exact():
    cmd = [sys.executable, str(BENCHMARKS / "bench_api_base.py"), "--prompts", "2", "--tokens", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| ")]
    ids = [r for r in rows if len(r) == 7 and r[1] == "tokens"]
    assert len(ids) == 4 and all(r[-1] == "2/2 |" for r in ids)  # the id path is local's output
    assert any(r[0] == "| 20" for r in rows)  # the top-k table


def test_abuse_battery_finds_no_defect(tmp_path):
    """Issues 16 and 28: a few cases of every category of benchmarks/abuse_server.py (the full
    battery is the script without --quick): each answered as documented, nothing 5xx, no
    traceback."""
    out = tmp_path / "abuse.json"
    cmd = [sys.executable, str(BENCHMARKS / "abuse_server.py"), "--quick", "--json", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["status_5xx"] == 0 and report["tracebacks"] == 0
    categories = report["categories"]
    assert len(categories) == 11
    assert all(c["tried"] == c["handled"] > 0 for c in categories.values())


def test_step_overhead_counts_overlapping_decodes_once():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from bench_speed import covered, step_overheads
    finally:
        sys.path.remove(str(BENCHMARKS))
    # two decodes overlapping in time (overlap's threads) count once; a gap counts as overhead
    spans = [(0.0, 4.0), (1.0, 5.0), (6.0, 9.0)]
    assert covered(spans, 0.0, 10.0) == 8.0
    assert step_overheads([0.0, 5.5, 10.0], spans) == [0.5, 1.5]
