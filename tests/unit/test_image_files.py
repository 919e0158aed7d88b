"""Image files at launch: what validation accepted must still hold when QEMU starts."""

from __future__ import annotations

import os
import subprocess

import pytest

from consolidator.errors import ImageError
from consolidator.hostfacts import HostFacts
from consolidator.inventory.files import disk_problems, inside
from consolidator.model import parse_fleet
from consolidator.vm.launch import check_image_files

FACTS = HostFacts(cpus=(0, 1), memory_total=8 << 30)


def intent(tmp_path, body: str):
    return parse_fleet(f"images:\n  x: {body}\nguests:\n  web: {{image: x}}\n", "t.yaml",
                       FACTS, base_dir=tmp_path).guests["web"]


def test_a_disk_swapped_for_a_link_after_validation_is_refused_at_launch(tmp_path):
    disk = tmp_path / "root.raw"
    disk.write_bytes(b"\0" * 4096)
    g = intent(tmp_path, "{disk: ./root.raw}")
    roots = (os.path.realpath(tmp_path),)
    check_image_files(g, roots)                       # as validated: fine
    disk.unlink()
    disk.symlink_to("/etc/hostname")                  # then swapped
    with pytest.raises(ImageError, match="no longer a regular file inside the image roots"):
        check_image_files(g, roots)


def test_a_base_rewritten_to_back_onto_a_host_file_is_refused_at_launch(tmp_path):
    disk = tmp_path / "root.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "1M"], check=True)
    g = intent(tmp_path, "{disk: ./root.qcow2}")
    roots = (os.path.realpath(tmp_path),)
    check_image_files(g, roots)
    subprocess.run(["qemu-img", "rebase", "-q", "-u", "-F", "raw", "-b", "/etc/hostname",
                    str(disk)], check=True)
    with pytest.raises(ImageError, match="backing file /etc/hostname is outside"):
        check_image_files(g, roots)


@pytest.mark.parametrize("path,ok", [("/r/a", True), ("/r", True), ("/r/../etc", False),
                                     ("/rr/a", False), ("/etc/x", False)])
def test_inside_a_root_means_below_it_after_resolving(path, ok):
    assert inside(path, ("/r",)) is ok


def test_a_chain_that_cannot_be_read_is_refused(tmp_path):
    bad = tmp_path / "missing-backing.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-u", "-b",
                    str(tmp_path / "gone.raw"), str(bad), "1M"], check=True)
    [(code, message)] = disk_problems(bad, "qcow2", (str(tmp_path),))
    assert code == "I012" and "cannot read its backing chain" in message
