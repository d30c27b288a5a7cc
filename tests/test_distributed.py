"""Batch jobs on a local Ray cluster (2 CPUs, tiny models): the single-process results."""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import pytest

from proxytune.jobs import iter_results, run_jobs

ray = pytest.importorskip("ray", reason="ray is not installed: pip install 'proxytune[ray]'")

LINES = [
    '{"id": "a", "prompt": "The quick brown fox", "max_new_tokens": 6}',
    '{"id": "b", "prompt": "Rain", "max_new_tokens": 6}',
    '{"id": "c", "prompt": "def add(a, b):", "temperature": 0.9, "seed": 4, "n": 2}',
    '{"id": "d", "prompt": "Numbers: 0 1", "alpha": 0.5}',
    '{"id": "e", "prompt": "Once upon a"}',
    '{"id": "f", "prompt": "x", "temperature": -1}',
]


def build(dirs: dict[str, str], crash_marker: str | None = None):
    """The tiny tuner; with ``crash_marker``, the first actor to run a batch dies (once)."""
    from proxytune import ProxyTuner

    tuner = ProxyTuner.from_pretrained(
        dirs["base"],
        expert=dirs["expert"],
        anti_expert=dirs["anti"],
        base_prompt="raw",
        expert_prompt="chat",
        anti_expert_prompt="raw",
        device="cpu",
        max_new_tokens=8,
    )
    if crash_marker is not None:
        generate = tuner.generate

        def dying(*args, **kwargs):
            if not Path(crash_marker).exists():
                Path(crash_marker).write_text("died once")
                os._exit(1)  # the actor's process dies mid-batch
            return generate(*args, **kwargs)

        tuner.generate = dying
    return tuner


def test_an_unreachable_address_is_one_line():
    from proxytune.distributed import connect
    from proxytune.errors import ConfigError

    if ray.is_initialized():
        pytest.skip("a cluster is running in this process")
    with pytest.raises(ConfigError, match=r"no Ray cluster answers at '127\.0\.0\.1:1'"):
        connect("127.0.0.1:1")


@pytest.fixture(scope="module")
def cluster():
    here = str(Path(__file__).resolve().parent)  # the actors import this module's build()
    path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
    env = {"env_vars": {"PYTHONPATH": path}}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env=env)
    yield ray
    ray.shutdown()


def by_id(path):
    rows = list(iter_results(path))
    assert len({r["id"] for r in rows}) == len(rows)
    return {r["id"]: r for r in rows}


def test_ray_results_equal_the_single_process_run_even_when_an_actor_dies(
    cluster, tiny_dirs, tmp_path
):
    from proxytune.distributed import ray_executor

    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(LINES) + "\n")
    dirs = {k: str(v) for k, v in tiny_dirs.items()}
    run_jobs(build(dirs), source, tmp_path / "local.jsonl", batch_size=2)
    marker = str(tmp_path / "crashed")
    pool = ray_executor(partial(build, dirs, marker), actors=2)
    summary = run_jobs(None, source, tmp_path / "ray.jsonl", batch_size=2, executor=pool)
    assert Path(marker).exists()  # an actor did die, and its batch was run again
    assert (summary.done, summary.failed) == (5, 1)
    assert by_id(tmp_path / "ray.jsonl") == by_id(tmp_path / "local.jsonl")
    # a killed driver: the output holds some lines and a torn one; the rerun completes it
    kept = (tmp_path / "ray.jsonl").read_text().splitlines()[:2]
    (tmp_path / "ray.jsonl").write_text("\n".join(kept) + '\n{"id": "e", "res')
    again = run_jobs(None, source, tmp_path / "ray.jsonl", batch_size=2, executor=pool)
    assert again.skipped == 2
    assert by_id(tmp_path / "ray.jsonl") == by_id(tmp_path / "local.jsonl")


def test_cli_ray_actors(cluster, tiny_dirs, tmp_path, capsys):
    from proxytune.cli import main

    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(LINES[:3]) + "\n")
    models = ["--base", str(tiny_dirs["base"]), "--expert", str(tiny_dirs["expert"])]
    models += ["--anti-expert", str(tiny_dirs["anti"]), "--device", "cpu"]
    models += ["--base-prompt", "raw", "--expert-prompt", "chat", "--anti-expert-prompt", "raw"]
    out = tmp_path / "out.jsonl"
    args = ["generate", *models, "--input", str(source), "--output", str(out)]
    assert main([*args, "--ray-actors", "2", "--max-new-tokens", "8"]) == 0
    assert "3 lines done" in capsys.readouterr().err
    local = tmp_path / "local.jsonl"
    local_args = ["generate", *models, "--input", str(source), "--output", str(local)]
    assert main([*local_args, "--max-new-tokens", "8"]) == 0
    assert by_id(out) == by_id(local)
    assert main(["generate", *models, "--ray-actors", "2", "Rain"]) == 2  # needs --input

