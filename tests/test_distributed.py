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


def eval_build(dirs: dict[str, str], crash_marker: str | None = None):
    """``build`` for ``eval``'s actors: ``(tuner, tuned)``; the first scorer to run dies once."""
    tuner = build(dirs)
    if crash_marker is not None:
        score = tuner.alone("base").__class__.generate

        def dying(self, *args, **kwargs):
            if not Path(crash_marker).exists():
                Path(crash_marker).write_text("died once")
                os._exit(1)
            return score(self, *args, **kwargs)

        tuner.__class__.generate = dying
    return tuner, None


def test_eval_on_ray_equals_the_local_run_even_when_an_actor_dies(cluster, tiny_dirs, tmp_path):
    """``proxytune eval --ray-actors``: every system's per-example results (generation and
    multiple choice, several alphas) equal the local run's; a dead actor's batch is rerun."""
    import json

    from proxytune.distributed import ray_eval_runner, system_source
    from proxytune.evaluation.runner import evaluate
    from proxytune.evaluation.systems import standard_systems
    from proxytune.evaluation.tasks import load_task

    rows = [{"prompt": f"Count {i}:", "answer": str(i)} for i in range(4)]
    (tmp_path / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    mc = [
        {"question": f"Pick {i}", "choices": ["red", "blue", "x"], "label": i % 3} for i in range(4)
    ]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc))
    dirs = {k: str(v) for k, v in tiny_dirs.items()}
    tuner = build(dirs)
    marker = tmp_path / "crashed"
    runner = ray_eval_runner(  # one pool of actors for both tasks
        partial(eval_build, dirs, str(marker)), lambda s: system_source(s, tuner), actors=2
    )
    for name in ("gen", "mc"):
        task = load_task(str(tmp_path / f"{name}.jsonl"))
        systems = standard_systems(tuner, alphas=(0.5, 1.0), include=("base", "proxy"))
        common = {"batch_size": 2, "progress": False, "settings": {"max_new_tokens": 5}}
        local = evaluate(task, systems, tmp_path / name / "local", **common)
        remote = evaluate(task, systems, tmp_path / name / "ray", **common, runner=runner)
        assert [s.metrics for s in remote.systems] == [s.metrics for s in local.systems]
        for system in systems:
            want = by_id(tmp_path / name / "local" / f"{system.name}.jsonl")
            assert by_id(tmp_path / name / "ray" / f"{system.name}.jsonl") == want
    assert marker.exists()  # an actor did die, and its batch was run again


def test_cli_eval_ray_actors(cluster, tiny_dirs, tmp_path, capsys):
    import json

    from proxytune.cli import main

    mc = [{"question": f"Pick {i}", "choices": ["red", "blue"], "label": i % 2} for i in range(3)]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc))
    models = ["--base", str(tiny_dirs["base"]), "--expert", str(tiny_dirs["expert"])]
    models += ["--anti-expert", str(tiny_dirs["anti"]), "--device", "cpu", "--no-progress"]
    args = ["eval", str(tmp_path / "mc.jsonl"), *models, "--json", "--out"]
    assert main([*args, str(tmp_path / "ray"), "--ray-actors", "1"]) == 0
    remote = json.loads(capsys.readouterr().out)
    assert main([*args, str(tmp_path / "local")]) == 0
    local = json.loads(capsys.readouterr().out)
    assert [s["metrics"] for s in remote["systems"]] == [s["metrics"] for s in local["systems"]]
