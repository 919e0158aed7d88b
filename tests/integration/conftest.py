"""Integration tests: real kernel, real QEMU. They skip only without root or QEMU, and
CI (CONSOLIDATOR_REQUIRE_INTEGRATION=1) turns such a skip into a failure."""

from __future__ import annotations

import os
import shutil

import pytest


@pytest.fixture
def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")


@pytest.fixture
def need_qemu() -> None:
    if not shutil.which("qemu-system-x86_64"):
        pytest.skip("needs qemu-system-x86_64")
