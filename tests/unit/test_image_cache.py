"""The image cache's choice of an unpacked kernel (plain files, no root)."""

from __future__ import annotations

from pathlib import Path

from consolidator.vm.image import unpacked_kernels


def _unpack(root: Path, pkg: str, version: str) -> Path:
    boot = root / pkg / "boot"
    boot.mkdir(parents=True)
    (boot / f"vmlinuz-{version}").write_bytes(b"kernel")
    return boot / f"vmlinuz-{version}"


def test_an_interrupted_unpack_is_never_chosen(tmp_path):
    _unpack(tmp_path, ".linux-image-6.1.0-9-cloud-amd64.tmp", "6.1.0-9-cloud-amd64")
    assert unpacked_kernels(tmp_path) == []
    done = _unpack(tmp_path, "linux-image-6.1.0-8-cloud-amd64", "6.1.0-8-cloud-amd64")
    assert unpacked_kernels(tmp_path) == [done]


def test_newest_unpacked_kernel_sorts_last(tmp_path):
    old = _unpack(tmp_path, "linux-image-6.1.0-8-cloud-amd64", "6.1.0-8-cloud-amd64")
    new = _unpack(tmp_path, "linux-image-6.1.0-10-cloud-amd64", "6.1.0-10-cloud-amd64")
    assert unpacked_kernels(tmp_path) == [old, new]
    assert unpacked_kernels(tmp_path / "absent") == []
