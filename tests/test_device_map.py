"""A model spread over devices by accelerate's device map (here: part on the CPU, the rest
offloaded to disk) gives the unsplit model's output."""

from __future__ import annotations

import pytest

from proxytune import ProxyTuner
from proxytune.errors import ConfigError
from proxytune.specs import ModelSpec
from proxytune.testing import save_tiny_model

PROMPTS = ["The quick brown fox", "Rain"]


def test_a_split_model_equals_the_whole_one(tmp_path):
    path = str(save_tiny_model(tmp_path / "base", seed=0, hidden=64, layers=4))
    whole = ProxyTuner.from_specs(ModelSpec(path, device="cpu"))
    split = ProxyTuner.from_specs(ModelSpec(path, max_memory={"cpu": "400KB", "disk": "1GB"}))
    places = set(split.base.model.model.hf_device_map.values())
    assert places == {"cpu", "disk"}  # really split: some layers on the CPU, the rest on disk
    want = whole.generate(PROMPTS, max_new_tokens=8, logprobs=True)
    got = split.generate(PROMPTS, max_new_tokens=8, logprobs=True)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    for g, w in zip(got, want, strict=True):
        assert [x.logprob for x in g.logprobs] == pytest.approx(
            [x.logprob for x in w.logprobs], abs=1e-5
        )


def test_bad_max_memory_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="max_memory must map devices"):
        ModelSpec("x", max_memory={})
    path = str(save_tiny_model(tmp_path / "base", seed=0))
    with pytest.raises(ConfigError, match="GPU 3, which this machine does not have"):
        ProxyTuner.from_specs(ModelSpec(path, max_memory={"3": "1GiB", "cpu": "1GiB"}))
