"""No input stops the inventory loader: what cannot be a file of YAML is refused before it
is read, and every refusal is FILE:LINE:COL with a code (exit 2 through the CLI)."""

from __future__ import annotations

import os

import pytest
from click.testing import CliRunner

from consolidator.cli.main import cli
from consolidator.errors import InventoryError
from consolidator.inventory.load import MAX_BYTES
from consolidator.model import load_fleet

pytestmark = pytest.mark.timeout(10)


def problems(path) -> list[str]:
    with pytest.raises(InventoryError) as ei:
        load_fleet(path)
    return [p.render() for p in ei.value.problems]


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path):
    fifo = tmp_path / "inventory.yaml"
    os.mkfifo(fifo)
    assert problems(fifo) == [f"{fifo}:1:1: (file): not a regular file (hint: an inventory "
                              "is a file of YAML) [Y004]"]


def test_a_file_over_the_limit_is_refused_unread(tmp_path):
    big = tmp_path / "inventory.yaml"
    big.write_bytes(b"# padding\n" * (MAX_BYTES // 10 + 1))
    (p,) = problems(big)
    assert p.startswith(f"{big}:1:1: (file): {big.stat().st_size} bytes: larger than the "
                        "512 KiB") and p.endswith("[Y004]")


def test_a_directory_is_refused(tmp_path):
    assert problems(tmp_path) == [f"{tmp_path}:1:1: (file): not a regular file (hint: an "
                                  "inventory is a file of YAML) [Y004]"]


def test_the_cli_says_it_in_one_line_and_exits_2(tmp_path):
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    res = CliRunner().invoke(cli, ["--state-dir", str(tmp_path), "validate", "-f", str(fifo)])
    assert res.exit_code == 2 and "not a regular file" in res.output
    assert "Traceback" not in res.output and "internal error" not in res.output


def test_dev_zero_is_refused_unread():
    """It used to be read until MemoryError."""
    assert problems("/dev/zero") == ["/dev/zero:1:1: (file): not a regular file (hint: an "
                                     "inventory is a file of YAML) [Y004]"]
