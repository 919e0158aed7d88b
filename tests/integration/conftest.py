"""Integration tests: real kernel, real QEMU. They skip only without root or QEMU, and
CI (CONSOLIDATOR_REQUIRE_INTEGRATION=1) turns such a skip into a failure."""

from __future__ import annotations

import os
import shutil

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The real-OS boots go last: minutes of TCG and gigabytes of disk writes whose
    aftermath (writeback, a cold page cache) would skew the tests that measure CPU shares
    and balloons, were they to run right after."""
    items.sort(key=lambda it: "integration/test_realos.py" in it.nodeid)


@pytest.fixture
def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")


@pytest.fixture
def need_qemu() -> None:
    if not shutil.which("qemu-system-x86_64"):
        pytest.skip("needs qemu-system-x86_64")


# ------------------------------------------------------------------ guests

import contextlib  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402

from consolidator.hostfacts import HostFacts  # noqa: E402
from consolidator.model import parse_fleet  # noqa: E402
from consolidator.vm.image import BuiltImage, build_tiny  # noqa: E402
from consolidator.vm.launch import VirtHost, launch_spec, prepare_boot  # noqa: E402
from consolidator.vm.guest import Guest  # noqa: E402
from consolidator.vm.qemu import RunPaths  # noqa: E402

IMAGE_CACHE = Path(os.environ.get("CONSOLIDATOR_IMAGE_CACHE",
                                  "/var/tmp/consolidator-test-images"))


def unique(prefix: str = "t") -> str:
    """A name no other test (or parallel run) uses: for instances, guests, netns."""
    return prefix + uuid.uuid4().hex[:7]


@pytest.fixture(scope="session")
def tiny_image() -> BuiltImage:
    if os.geteuid() != 0 or not shutil.which("qemu-system-x86_64"):
        pytest.skip("needs root and qemu-system-x86_64")
    os.environ["CONSOLIDATOR_IMAGE_CACHE"] = str(IMAGE_CACHE)
    return build_tiny(IMAGE_CACHE)


@pytest.fixture(scope="session")
def virt_host() -> VirtHost:
    return VirtHost.probe()


def intent_from(yaml_text: str, name: str):
    fleet = parse_fleet(yaml_text, "test.yaml", HostFacts.probe())
    return fleet.guests[name]


@pytest.fixture
def make_guest(tmp_path, tiny_image, virt_host):
    """Factory: make_guest(yaml_guest_body, **Guest kwargs) -> Guest (not launched).
    Every guest made is shut down and cleaned up at teardown, pass or fail."""
    made: list[Guest] = []

    def factory(body: str = "{}", *, name: str | None = None, boot=None, spec_kw=None,
                intent=None, **kw) -> Guest:
        name = name or (intent.name if intent else unique("g"))
        intent = intent or intent_from(f"guests:\n  {name}: {body}\n", name)
        gdir = tmp_path / name
        gdir.mkdir(exist_ok=True)
        boot = boot or prepare_boot(intent, IMAGE_CACHE, gdir, built=tiny_image)
        spec = launch_spec(intent, boot, RunPaths.for_guest(gdir), virt_host)
        if spec_kw:
            from dataclasses import replace
            spec = replace(spec, **spec_kw)
        g = Guest(spec, **kw)
        made.append(g)
        return g

    yield factory
    for g in made:
        g.abandon()


@contextlib.asynccontextmanager
async def running(g: Guest, stop_timeout: float = 10.0):
    """Launch ``g``; shut it down and clean up in the same event loop, pass or fail."""
    try:
        await g.launch()
        yield g
    finally:
        with contextlib.suppress(Exception):
            if g.alive():
                await g.shutdown(timeout=stop_timeout)
        await g.cleanup()
