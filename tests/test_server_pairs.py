"""Live pairs: the admin API loads, replaces and unloads pairs while the server serves."""

from __future__ import annotations

import dataclasses
import gc
import json
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
import httpx
from serving import serve_in_thread

from proxytune import ProxyTuner
from proxytune.errors import ConfigError
from proxytune.prompts import PromptFormat
from proxytune.schedules import Constant
from proxytune.server import ServerSettings, create_app
from proxytune.testing import cpu_tuner, save_tiny_lora, save_tiny_model

KEY = "sekret"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPTS = ["The quick brown fox", "def add(a, b):", "Rain falls on the quiet town", "Once upon"]
GREEDY = {"max_tokens": 24, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def root(tiny_dirs, tmp_path_factory) -> Path:
    """A model root holding a second expert, an adapter of the base and a broken model."""
    root = tmp_path_factory.mktemp("root")
    save_tiny_model(root / "expert2", seed=7)
    save_tiny_lora(tiny_dirs["base"], root / "lora", seed=3)
    (root / "broken").mkdir()
    (root / "broken" / "config.json").write_text("{not json")
    import shutil

    shutil.copytree(root / "expert2", root / "nochat")  # a model without a chat template
    (root / "nochat" / "chat_template.jinja").unlink()

    import torch
    from safetensors.torch import load_file

    shutil.copytree(root / "expert2", root / "pickled")  # the same weights as a pickle
    weights = root / "pickled" / "model.safetensors"
    torch.save(load_file(weights), root / "pickled" / "pytorch_model.bin")
    weights.unlink()
    return root


@pytest.fixture
def served(tiny_dirs, root) -> Iterator[tuple[str, ProxyTuner]]:
    """A server (API key, model roots: ``root`` and the tiny models' folder) on a fresh tuner."""
    tuner = cpu_tuner(tiny_dirs["base"], tiny_dirs["expert"], tiny_dirs["anti"])
    settings = ServerSettings(
        model_name="m", api_key=KEY, model_roots=(str(root), str(tiny_dirs["base"].parent))
    )
    with serve_in_thread(create_app(tuner, settings)) as url:
        yield url, tuner


def complete(url: str, prompt: str, **extra) -> str:
    body = {"prompt": prompt, **GREEDY, **extra}
    r = httpx.post(f"{url}/v1/completions", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def put(url: str, name: str, **body) -> httpx.Response:
    body = {"expert_prompt": "raw", "anti_expert_prompt": "raw", **body}
    return httpx.put(f"{url}/admin/pairs/{name}", json=body, headers=AUTH, timeout=60)


def names(url: str) -> list[str]:
    r = httpx.get(f"{url}/admin/pairs", headers=AUTH)
    assert r.status_code == 200, r.text
    return [p["name"] for p in r.json()["pairs"]]


def texts(tuner: ProxyTuner, max_tokens: int = GREEDY["max_tokens"]) -> list[str]:
    out = tuner.generate(PROMPTS, max_new_tokens=max_tokens, ignore_eos=True)
    return [r.text for r in out]


def test_a_swapped_pair_serves_new_requests_while_running_ones_finish_on_theirs(
    served, tiny_dirs, root
):
    url, _ = served
    long = 128  # long enough to outlast the swap on a busy machine
    want_a = texts(cpu_tuner(tiny_dirs["base"], tiny_dirs["expert"], tiny_dirs["anti"]), long)
    ref_b = cpu_tuner(tiny_dirs["base"], root / "expert2", tiny_dirs["anti"])
    got: dict[int, list[str]] = {i: [] for i in range(len(PROMPTS))}
    last_at: dict[int, float] = {}
    started = threading.Barrier(len(PROMPTS) + 1, timeout=60)

    def stream(i: int) -> None:
        body = {"prompt": PROMPTS[i], **GREEDY, "max_tokens": long, "stream": True}
        with httpx.stream(
            "POST", f"{url}/v1/completions", json=body, headers=AUTH, timeout=120
        ) as r:
            first = True
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                got[i].append(json.loads(line[6:])["choices"][0]["text"])
                last_at[i] = time.monotonic()
                if first:
                    first = False
                    started.wait()

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    started.wait()  # every stream is decoding on pair A
    swap = put(url, "0", expert=str(root / "expert2"), anti_expert=str(tiny_dirs["anti"]))
    swapped_at = time.monotonic()
    assert swap.status_code == 200, swap.text
    assert swap.json()["replaced"] is True
    after = [complete(url, p) for p in PROMPTS]  # new requests: pair B
    for t in threads:
        t.join(120)
    assert ["".join(got[i]) for i in range(len(PROMPTS))] == want_a
    assert max(last_at.values()) > swapped_at  # some stream was still running on A
    assert after == texts(ref_b)
    assert names(url) == ["0"]


def test_unloading_a_pair_frees_its_model(served, tiny_dirs, root):
    url, tuner = served
    r = put(url, "extra", expert=str(root / "expert2"), anti_expert=str(tiny_dirs["anti"]))
    assert r.status_code == 200, r.text
    assert names(url) == ["0", "extra"]
    assert httpx.get(f"{url}/v1/models/m", headers=AUTH).json()["pairs"] == 2
    assert complete(url, PROMPTS[0], active_pairs=[1])
    model = weakref.ref(tuner.pairs[1].expert.model)
    r = httpx.delete(f"{url}/admin/pairs/extra", headers=AUTH)
    assert r.status_code == 200, r.text
    assert names(url) == ["0"]
    assert httpx.get(f"{url}/v1/models/m", headers=AUTH).json()["pairs"] == 1
    gc.collect()
    assert model() is None
    gone = httpx.post(
        f"{url}/v1/completions", json={"prompt": "x", "active_pairs": [1]}, headers=AUTH
    )
    assert gone.status_code == 400 and "active_pairs" in gone.text
    missing = httpx.delete(f"{url}/admin/pairs/extra", headers=AUTH)
    assert missing.status_code == 404 and "'0'" in missing.json()["error"]["message"]


def test_an_added_pair_joins_every_request_that_names_no_active_pairs(served, tiny_dirs, root):
    """The documented behaviour (docs/operations.md): a loaded pair is one more pair of the
    served set, run by default at its alpha like the recipe's; one loaded at alpha 0 is
    staged: it runs only for a request that gives it an alpha."""
    from proxytune.server.pairs import renumbered

    url, _ = served
    one = cpu_tuner(tiny_dirs["base"], tiny_dirs["expert"], tiny_dirs["anti"])
    other = cpu_tuner(tiny_dirs["base"], root / "expert2", tiny_dirs["anti"])
    both = ProxyTuner(one.base, [one.pairs[0], renumbered(other.pairs[0], 1)])
    sides = {"expert": str(root / "expert2"), "anti_expert": str(tiny_dirs["anti"])}
    alone = complete(url, PROMPTS[0])
    assert alone == texts(one)[0]
    assert put(url, "extra", **sides).status_code == 200
    assert complete(url, PROMPTS[0]) == texts(both)[0] != alone  # it joined
    assert complete(url, PROMPTS[0], active_pairs=[0]) == alone
    assert put(url, "extra", **sides, alpha=0).status_code == 200  # staged
    assert complete(url, PROMPTS[0]) == alone
    assert complete(url, PROMPTS[0], alpha=[1.0, 1.0]) == texts(both)[0]
    assert httpx.delete(f"{url}/admin/pairs/extra", headers=AUTH).status_code == 200


def test_a_pair_that_fails_to_load_leaves_the_running_set_untouched(served, tiny_dirs, root):
    url, _ = served
    before = httpx.get(f"{url}/admin/pairs", headers=AUTH).json()
    want = complete(url, PROMPTS[1])
    for name in ("0", "new"):
        r = put(url, name, expert=str(root / "broken"), anti_expert=str(tiny_dirs["anti"]))
        assert r.status_code in (400, 422), r.text
        message = r.json()["error"]["message"]
        assert "\n" not in message and "broken" in message
    assert httpx.get(f"{url}/admin/pairs", headers=AUTH).json() == before
    assert complete(url, PROMPTS[1]) == want


NO_CHAT = "cannot read a prompt: prompt format 'chat' was chosen for a model whose tokenizer"


def test_a_load_that_would_break_serving_is_refused_and_changes_nothing(
    served, tiny_dirs, root, capsys
):
    """The new set is probed end to end before the swap (a text and a chat prompt rendered by
    every model, one scored step): a chat format on a model without a chat template would
    otherwise load and then fail every request."""
    from proxytune.cli import main

    url, _ = served
    before = httpx.get(f"{url}/admin/pairs", headers=AUTH).json()
    want = complete(url, PROMPTS[1])
    sides = {"expert": str(root / "nochat"), "anti_expert": str(tiny_dirs["anti"])}
    for name in ("0", "new"):
        r = put(url, name, **sides, expert_prompt="chat")
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["code"] == "pair_not_loaded" and NO_CHAT in error["message"]
        assert error["message"].startswith("refused, nothing changed: the expert[")
    common = ["--server", url, "--api-key", KEY, "--expert-prompt", "chat"]
    load = [
        "pairs",
        "load",
        "0",
        "--expert",
        sides["expert"],
        "--anti-expert",
        sides["anti_expert"],
    ]
    assert main([*load, *common]) == 2
    assert NO_CHAT in capsys.readouterr().err
    assert httpx.get(f"{url}/admin/pairs", headers=AUTH).json() == before
    assert complete(url, PROMPTS[1]) == want
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert httpx.post(f"{url}/v1/chat/completions", json=chat, headers=AUTH).status_code == 200
    assert put(url, "new", **sides, expert_prompt="raw").status_code == 200  # raw reads it


def test_serve_refuses_at_start_up_a_model_set_that_would_fail_every_request(
    tiny_dirs, root, monkeypatch, capsys
):
    import proxytune.server.shutdown
    from proxytune.cli import main

    served = []
    monkeypatch.setattr(
        proxytune.server.shutdown, "run_draining", lambda *a, **k: served.append(a) or 0
    )
    models = ["serve", "--base", str(tiny_dirs["base"]), "--anti-expert", str(tiny_dirs["anti"])]
    models += ["--device", "cpu", "--dtype", "float32", "--anti-expert-prompt", "raw"]
    assert main([*models, "--expert", str(root / "nochat"), "--expert-prompt", "chat"]) == 2
    assert NO_CHAT in capsys.readouterr().err and not served
    assert main([*models, "--expert", str(root / "nochat"), "--expert-prompt", "raw"]) == 0
    assert len(served) == 1


def test_a_model_set_is_checked_end_to_end_before_it_serves(tiny_dirs, root):
    tuner = cpu_tuner(tiny_dirs["base"], root / "nochat", tiny_dirs["anti"])  # raw: fine
    tuner.check_ready()
    chat = ProxyTuner(
        tuner.base,
        [
            dataclasses.replace(
                tuner.pairs[0],
                expert=dataclasses.replace(tuner.pairs[0].expert, prompt=PromptFormat("chat")),
            )
        ],
    )
    with pytest.raises(ConfigError, match=r"the expert\[0\] \(.*nochat\) " + NO_CHAT):
        chat.check_ready(step=False)  # the renders alone already refuse it

    strong = dataclasses.replace(tuner.pairs[0], alpha=Constant(1.5))  # the pair's own alpha
    with pytest.raises(ConfigError, match=r"probe prompt failed: alpha: rule 'mixture' .* 1.5"):
        ProxyTuner(tuner.base, [strong], rule="mixture").check_ready()
    # the rule is checked against the models, the alphas where they run: two pairs at their
    # own alpha 1 take the mixture with a call's alphas that sum to at most 1
    from proxytune.server.pairs import renumbered

    two = ProxyTuner(tuner.base, [tuner.pairs[0], renumbered(tuner.pairs[0], 1)], rule="mixture")
    assert two.generate("Hello", alpha=[0.5, 0.4], max_new_tokens=2)[0].token_ids
    with pytest.raises(ConfigError, match=r"^alpha: rule 'mixture' .*got 1, 1;"):
        two.generate("Hello", max_new_tokens=2)

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    tuner.pairs[0].anti_expert.model.start = broken
    with pytest.raises(ConfigError, match="one decoding step on a probe prompt failed: Runtime"):
        tuner.check_ready()


def test_the_admin_api_checks_the_key_and_the_model_roots(served, tiny_dirs, root, tmp_path):
    url, _ = served
    assert httpx.get(f"{url}/admin/pairs").status_code == 401
    outside = save_tiny_model(tmp_path / "outside", seed=9)
    cases = {
        str(outside): (403, "--model-root"),
        "relative/model": (403, "absolute path"),
        str(root / "nothing-here"): (400, "does not exist"),
        str(root / ".." / outside.name): (403, "--model-root"),
    }
    for path, (status, words) in cases.items():
        r = put(url, "p", expert=path)
        assert r.status_code == status, (path, r.text)
        assert words in r.json()["error"]["message"]
    (root / "link").symlink_to(outside, target_is_directory=True)
    try:
        assert put(url, "p", expert=str(root / "link")).status_code == 403  # symlinks resolved
    finally:
        (root / "link").unlink()
    assert put(url, "bad name!", expert=str(root / "expert2")).status_code == 400
    pickled = put(url, "p", expert=str(root / "pickled"))  # no --allow-pickle: refused
    assert pickled.status_code in (400, 422) and "safetensors" in pickled.text
    assert "--allow-pickle" in pickled.text and "allow_pickle=True (Python)" in pickled.text
    assert names(url) == ["0"]


def test_hostile_admin_requests_get_a_clean_4xx_and_change_nothing(served, tiny_dirs, root):
    url, _ = served
    model = str(root / "expert2")
    for name in ("%2e%2e", "%2e", ".hidden", "a%00b", "caf%C3%A9"):
        r = put(url, name, expert=model)
        assert r.status_code == 400, (name, r.text)
        assert "not starting with '.'" in r.json()["error"]["message"]
    r = put(url, "p", expert=model[:5] + "\x00" + model[5:])
    assert r.status_code == 400 and "NUL character" in r.json()["error"]["message"]
    assert "ValueError" not in r.text
    r = httpx.delete(f"{url}/admin/pairs/a%00b", headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["code"] == "no_pair"
    wrong = ("Authorization", "Bearer wrong")
    for headers in ([wrong, *AUTH.items()], [*AUTH.items(), wrong], [*AUTH.items()] * 2):
        r = httpx.get(f"{url}/admin/pairs", headers=headers)
        assert r.status_code == 401 and "send one 'Authorization" in r.text, headers
    assert names(url) == ["0"]


def test_without_a_key_or_roots_the_admin_api_refuses(tuner, tiny_dirs, root):
    with serve_in_thread(create_app(tuner, ServerSettings(model_name="m"))) as url:
        r = httpx.get(f"{url}/admin/pairs")
        assert r.status_code == 403 and "--api-key" in r.json()["error"]["message"]
    with serve_in_thread(create_app(tuner, ServerSettings(model_name="m", api_key=KEY))) as url:
        r = put(url, "p", expert=str(root / "expert2"))
        assert r.status_code == 403 and "--model-root" in r.json()["error"]["message"]


def test_a_trained_adapter_loads_as_a_pair(served, tiny_dirs, root):
    url, _ = served
    r = put(url, "lora", expert=str(root / "lora"), anti_expert=str(tiny_dirs["base"]))
    assert r.status_code == 200, r.text
    ref = cpu_tuner(tiny_dirs["base"], root / "lora", tiny_dirs["base"])
    want = ref.generate(PROMPTS[0], max_new_tokens=GREEDY["max_tokens"], ignore_eos=True)[0]
    assert complete(url, PROMPTS[0], active_pairs=[1]) == want.text


def test_the_pairs_command_changes_a_running_server(served, tiny_dirs, root, capsys):
    from proxytune.cli import main

    url, _ = served
    common = ["--server", url, "--api-key", KEY]
    load = ["pairs", "load", "b", "--expert", str(root / "expert2"), "--alpha", "0.5"]
    assert main([*load, "--expert-prompt", "raw", *common]) == 0
    assert "loaded b" in capsys.readouterr().out
    assert main(["pairs", "list", *common]) == 0
    out = capsys.readouterr().out
    assert "[1] b: alpha=0.5 expert=" in out and "[0] 0:" in out
    assert main(["pairs", "unload", "b", *common]) == 0
    assert names(url) == ["0"]
    assert main(["pairs", "unload", "b", *common]) == 2
    assert "404" in capsys.readouterr().err
    assert main(["pairs", "list", "--server", url]) == 2  # no key


def test_a_gguf_loads_as_a_pair(served, tiny_dirs, root):
    from proxytune.backends import llamacpp
    from proxytune.backends.gguf_write import write_gguf
    from proxytune.specs import ModelSpec

    if not llamacpp.available():
        pytest.skip(f"llama-cpp-python is not installed ({llamacpp.INSTALL})")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = root / "expert2"
    gguf = root / "expert2.gguf"
    if not gguf.exists():
        write_gguf(
            AutoModelForCausalLM.from_pretrained(folder),
            AutoTokenizer.from_pretrained(folder),
            gguf,
        )
    url, _ = served
    r = put(url, "gguf", expert=str(gguf), anti_expert=str(tiny_dirs["anti"]))
    assert r.status_code == 200, r.text
    assert r.json()["pairs"][1]["expert"]["model"] == str(gguf)

    def spec(path: Path) -> ModelSpec:
        return ModelSpec(str(path), prompt="raw", device="cpu", dtype="float32")

    ref = ProxyTuner.from_specs(
        spec(tiny_dirs["base"]), [(spec(gguf), spec(tiny_dirs["anti"]), 1.0)]
    )
    want = ref.generate(PROMPTS[0], max_new_tokens=GREEDY["max_tokens"], ignore_eos=True)[0]
    assert complete(url, PROMPTS[0], active_pairs=[1]) == want.text


def test_a_half_loaded_pair_keeps_no_model_alive(tiny_dirs, root):
    from proxytune.server.pairs import LivePairs, PairLoad

    tuner = cpu_tuner(tiny_dirs["base"], tiny_dirs["expert"], tiny_dirs["anti"])
    live = LivePairs(tuner, roots=[str(root)])
    request = PairLoad(expert=str(root / "expert2"), anti_expert=str(root / "broken"))
    with pytest.raises(Exception, match="broken"):
        live.load("x", request)
    assert live._cache == {} and live.names == ["0"]


def test_pickled_weights_load_only_where_the_server_allows_them(tiny_dirs, root):
    from proxytune.server.pairs import LivePairs, PairLoad

    tuner = cpu_tuner(tiny_dirs["base"], tiny_dirs["expert"], tiny_dirs["anti"])
    request = PairLoad(expert=str(root / "pickled"), expert_prompt="raw")
    with pytest.raises(Exception, match="safetensors"):
        LivePairs(tuner, roots=[str(root)]).load("p", request)
    new = LivePairs(tuner, roots=[str(root)], allow_pickle=True).load("p", request)
    assert [p.name for p in new.pairs] == ["0", "p"]
