"""Drift: per-pair steering statistics, a baseline captured from a running server, alerts in
/health and /metrics; the shipped Prometheus rules and Grafana dashboard use real names."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
import httpx
from serving import serve_in_thread

from proxytune import ProxyTuner
from proxytune.cli import main
from proxytune.server import ServerSettings, create_app
from proxytune.server.drift import DriftMonitor, parse_thresholds
from proxytune.testing import cpu_tuner, save_tiny_model

REPO = Path(__file__).resolve().parents[1]
REFERENCE = [
    "The quick brown fox",
    "Rain falls on the quiet town",
    "Once upon a time there was",
    "Proxy tuning steers",
]
SHIFTED = ["0 1 2 3 4 5 6 7 8 9", "12345678901234567890", "3.14159 2.71828 1.41421", "404 500"]
TOKENS = 32


@pytest.fixture(scope="module")
def tuner(tmp_path_factory) -> ProxyTuner:
    """A pair whose expert is its anti-expert with the digits' embeddings moved: it steers
    little on words and a lot on numbers (a traffic shift the monitor must see)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("drift")
    base, anti = save_tiny_model(root / "base", seed=0), save_tiny_model(root / "anti", seed=2)
    tokenizer = AutoTokenizer.from_pretrained(anti)
    model = AutoModelForCausalLM.from_pretrained(anti)
    digits = [i for t, i in tokenizer.get_vocab().items() if any(c.isdigit() for c in t)]
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(0)
        weight = model.get_input_embeddings().weight
        weight[digits] += 2.0 * torch.randn(len(digits), weight.shape[1])
    model.save_pretrained(root / "expert")
    tokenizer.save_pretrained(root / "expert")
    return cpu_tuner(base, root / "expert", anti)


@pytest.fixture(scope="module")
def baseline(tuner, tmp_path_factory) -> Path:
    """``proxytune monitor baseline`` against a server, on the reference prompts."""
    folder = tmp_path_factory.mktemp("baseline")
    prompts = folder / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in REFERENCE) + "\n")
    out = folder / "baseline.json"
    with serve_in_thread(create_app(tuner, ServerSettings(model_name="m"))) as url:
        argv = ["monitor", "baseline", "--server", url, "--prompts", str(prompts)]
        assert main([*argv, "--out", str(out), "--max-tokens", str(TOKENS)]) == 0
    return out


@pytest.fixture(scope="module")
def watched(tuner, baseline) -> Iterator[str]:
    settings = ServerSettings(
        model_name="m",
        drift_baseline=str(baseline),
        drift_thresholds=parse_thresholds(["0.5"]),
        drift_window=len(REFERENCE) * TOKENS,
        drift_min_tokens=TOKENS,
    )
    with serve_in_thread(create_app(tuner, settings)) as url:
        yield url


def send(url: str, prompts: list[str]) -> None:
    for p in prompts:
        body = {"prompt": p, "max_tokens": TOKENS, "temperature": 0}
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 200


def test_the_baseline_holds_each_pairs_means(baseline):
    record = json.loads(baseline.read_text())
    stats = record["pairs"]["0"]
    assert record["prompts"] == len(REFERENCE)
    assert stats["tokens"] > 0 and 0 <= stats["changed"] <= 1
    assert stats["kl"] >= 0 and stats["entropy"] > 0


def test_an_offline_baseline_equals_the_servers(tuner, baseline, tmp_path):
    pair = tuner.pairs[0]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"""
base: {{model: "{tuner.base.model.name}", prompt: raw}}
pairs:
  - expert: {{model: "{pair.expert.model.name}", prompt: raw}}
    anti_expert: {{model: "{pair.anti_expert.model.name}", prompt: raw}}
model_defaults: {{device: cpu, dtype: float32}}
"""
    )
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(REFERENCE) + "\n")
    out = tmp_path / "offline.json"
    argv = ["monitor", "baseline", "--recipe", str(recipe), "--prompts", str(prompts)]
    assert main([*argv, "--out", str(out), "--max-tokens", str(TOKENS)]) == 0
    served = json.loads(baseline.read_text())["pairs"]
    offline = json.loads(out.read_text())["pairs"]
    assert offline.keys() == served.keys()
    for name, stats in served.items():
        assert offline[name] == pytest.approx(stats, rel=1e-5)


def test_a_drift_alert_fires_on_a_shifted_prompt_set_and_not_on_the_baseline_set(watched):
    send(watched, REFERENCE)
    health = httpx.get(f"{watched}/health").json()
    assert health["status"] == "ok" and health["drift"]["state"] == "ok"
    assert health["drift"]["pairs"]["0"]["alerts"] == []
    assert 'proxytune_drift_alerting 0' in httpx.get(f"{watched}/metrics").text
    send(watched, SHIFTED)
    health = httpx.get(f"{watched}/health").json()
    assert health["drift"]["state"] == "alert"
    assert "kl" in health["drift"]["pairs"]["0"]["alerts"]
    metrics = httpx.get(f"{watched}/metrics").text
    assert 'proxytune_drift_alert{pair="0",stat="kl"} 1' in metrics
    assert "proxytune_drift_alerting 1" in metrics
    send(watched, REFERENCE * 2)  # the window holds reference traffic again: the alert clears
    assert httpx.get(f"{watched}/health").json()["drift"]["state"] == "ok"


def test_every_metric_in_the_alert_rules_and_dashboard_is_exported(watched):
    send(watched, REFERENCE[:1])
    exported = {
        line.split("{")[0].split(" ")[0]
        for line in httpx.get(f"{watched}/metrics").text.splitlines()
        if line and not line.startswith("#")
    }
    rules = (REPO / "deploy/prometheus/alerts.yml").read_text()
    dashboard = json.loads((REPO / "deploy/grafana/proxytune.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = set(re.findall(r"\bproxytune_[a-z_]+", rules + "\n".join(exprs)))
    assert used and "proxytune_drift_alert" in used and "proxytune_fallbacks_total" in used
    assert used <= exported, sorted(used - exported)
    import yaml

    groups = yaml.safe_load(rules)["groups"]
    assert all("expr" in r and "alert" in r for g in groups for r in g["rules"])


def test_the_window_forgets_old_tokens_and_thresholds_parse():
    monitor = DriftMonitor({"a": {"kl": 1.0}}, {"kl": 0.5}, window=10, min_tokens=5)
    monitor.observe({"a": [10.0, 0.0, 0.0, 10]})  # mean 1.0: on baseline
    assert monitor.alerts() == {"a": []}
    monitor.observe({"a": [30.0, 0.0, 0.0, 10]})  # the window now holds only these: mean 3.0
    assert monitor.alerts() == {"a": ["kl"]}
    monitor.reset("a")
    assert monitor.alerts() == {}
    assert parse_thresholds(["0.2", "kl=1"]) == {"kl": 1.0, "changed": 0.2, "entropy": 0.2}
    for bad in ("x=1", "kl=-1", "kl=much"):
        with pytest.raises(Exception, match="drift-threshold"):
            parse_thresholds([bad])
