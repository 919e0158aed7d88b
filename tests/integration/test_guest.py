"""Real guests: boot the builtin image under this host's accelerator and drive it."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from consolidator.errors import ConflictError, LaunchError, ReadyTimeout
from consolidator.units import MiB
from consolidator.vm.guest import Runstate
from consolidator.vm.image import build_tiny, busybox_path, guest_tree
from consolidator.vm.qemu import Boot

from .conftest import running


def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def cpu_seconds(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


async def settle_balloon(g, target: int, timeout: float = 20.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        actual = await g.qmp.balloon()
        if abs(actual - target) < 4 * MiB or time.monotonic() > deadline:
            return actual
        await asyncio.sleep(0.25)


async def fresh_stats(g, after: int, timeout: float = 10.0):
    """Guest stats newer than ``after`` (the guest pushes them every second)."""
    deadline = time.monotonic() + timeout
    while True:
        st = await g.qmp.guest_stats()
        if st.last_update > after or time.monotonic() > deadline:
            return st
        await asyncio.sleep(0.2)


@pytest.mark.quiet                   # QEMU must get a whole core when its guest burns one
def test_boot_agent_balloon_load_and_graceful_stop(make_guest):
    g = make_guest("{vcpus: 1, memory: {max: 256MiB}}")

    async def body():
        async with running(g):
            assert g.state is Runstate.RUNNING
            assert g.duration(Runstate.STARTING) < 60
            agent = await g.agent()
            assert await agent.ping() > 0
            assert (await agent.status())["name"] == g.name
            # an idle guest can stop ticking: high-res timers and NOHZ on every CPU (on
            # microvm without ARAT the guest stayed periodic at HZ: 250 interrupts/s)
            rc, out = await agent.sh("grep -E 'hres_active|nohz_mode' /proc/timer_list")
            assert rc == 0 and out.count(": 1") >= 1 and ": 0" not in out, out
            assert "nohz_mode      : 2" in out, out

            # -- balloon to half: the guest's usable memory and QEMU's RSS both drop
            await agent.mem(150)          # touch guest RAM so that it is resident on the host
            await agent.mem(0)
            before_mem = await agent.meminfo()
            before_rss = rss(g.pid)
            actual = await settle_balloon(g, 128 * MiB)
            await g.qmp.set_balloon(128 * MiB)
            actual = await settle_balloon(g, 128 * MiB)
            after_mem = await agent.meminfo()
            await asyncio.sleep(1)
            after_rss = rss(g.pid)
            seen = (f"balloon {actual >> 20} MiB, MemAvailable {before_mem['MemAvailable'] >> 20}"
                    f"->{after_mem['MemAvailable'] >> 20} MiB, RSS {before_rss >> 20}->"
                    f"{after_rss >> 20} MiB")
            assert abs(actual - 128 * MiB) < 4 * MiB, seen
            # With deflate-on-oom (which we keep, as the OOM safety net), Linux counts
            # ballooned pages as used instead of shrinking MemTotal: usable memory drops.
            dropped = before_mem["MemAvailable"] - after_mem["MemAvailable"]
            assert 100 * MiB < dropped < 150 * MiB, seen
            assert before_rss - after_rss > 64 * MiB, seen
            await g.qmp.set_balloon(256 * MiB)
            await settle_balloon(g, 256 * MiB)
            # -- the events are the guest's (a bounded log); QMP's listeners keep none of
            # them (qemu.qmp's would keep each for the connection's life: a slow leak)
            assert [e for e in g.events if e["event"] == "BALLOON_CHANGE"], list(g.events)
            listeners = g.qmp._client._listeners
            assert listeners and not any(x.history for x in listeners), listeners

            # -- mem 64: guest-stats available memory falls by about 64 MiB
            base = await fresh_stats(g, 0)
            base = await fresh_stats(g, base.last_update)
            assert await agent.mem(64) == 64
            held = await fresh_stats(g, base.last_update)
            held = await fresh_stats(g, held.last_update)
            fall = base.available - held.available
            assert 56 * MiB < fall < 72 * MiB, \
                f"available {base.available >> 20}->{held.available >> 20} MiB"
            await agent.mem(0)

            # -- cpu 100 on one vCPU: QEMU burns about one core
            await agent.cpu(100)
            await asyncio.sleep(1)
            c0, t0 = cpu_seconds(g.pid), time.monotonic()
            await asyncio.sleep(5)
            cores = (cpu_seconds(g.pid) - c0) / (time.monotonic() - t0)
            await agent.cpu(0)
            assert 0.8 < cores < 1.3, f"{cores:.2f} cores"

            # -- graceful stop within 10 s
            t = time.monotonic()
            ex = await g.shutdown(timeout=10)
            took = time.monotonic() - t
            assert took < 10, took
            assert ex.exitcode == 0 and ex.signal is None
            assert g.state is Runstate.STOPPED
        assert not any(p.exists() for p in g.paths.sockets())

    asyncio.run(body())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_disk_image_boots_from_overlay_and_base_is_untouched(make_guest, tmp_path, tiny_image):
    # a raw ext4 root holding the same busybox tree the initramfs has
    tree = tmp_path / "rootfs"
    tree.mkdir()
    guest_tree(busybox_path(), []).write_dir(tree)
    (tree / "etc/disk-marker").write_text("on-disk\n")
    base = tmp_path / "root.raw"
    subprocess.run(["mke2fs", "-q", "-t", "ext4", "-d", str(tree), str(base), "64M"],
                   check=True)
    before = sha256(base)
    body = "{image: rooted}"
    from consolidator.hostfacts import HostFacts
    from consolidator.model import parse_fleet
    from consolidator.vm.launch import prepare_boot
    inv = (f"images:\n  rooted: {{builtin: tiny, disk: {base}}}\n"
           f"guests:\n  disk1: {body}\n")
    intent = parse_fleet(inv, "t.yaml", HostFacts.probe(), base_dir=tmp_path).guests["disk1"]
    gdir = tmp_path / "disk1"
    gdir.mkdir()
    boot = prepare_boot(intent, tiny_image.dir.parent, gdir, built=tiny_image)
    assert boot.disk == str(gdir / "disk.qcow2")
    g = make_guest(intent=intent, boot=boot)

    async def body_():
        async with running(g):
            agent = await g.agent()
            rc, out = await agent.sh("cat /etc/disk-marker; mount | grep ' on / '")
            assert rc == 0 and "on-disk" in out and "/dev/vda" in out, out
            rc, _ = await agent.sh("echo written-by-guest > /root/note && sync")
            assert rc == 0
        # boot again: the note survived in the overlay
        async with running(g):
            rc, out = await (await g.agent()).sh("cat /root/note")
            assert out.strip() == "written-by-guest"

    asyncio.run(body_())
    assert sha256(base) == before
    info = subprocess.run(["qemu-img", "info", "-U", str(gdir / "disk.qcow2")],
                          capture_output=True, text=True).stdout
    assert f"backing file: {base}" in info


def test_ready_timeout_stops_and_leaves_nothing(make_guest):
    g = make_guest("{}", ready_timeout=0.3)

    async def body():
        with pytest.raises(ReadyTimeout) as ei:
            await g.launch()
        return ei.value

    err = asyncio.run(body())
    assert "not ready (marker) within 0.3s" in err.message and err.argv
    assert g.state is Runstate.CRASHED
    assert g.proc is not None and g.proc.poll() is not None
    assert not psutil.pid_exists(g.proc.pid) or \
        psutil.Process(g.proc.pid).status() == psutil.STATUS_ZOMBIE
    assert not any(p.exists() for p in (*g.paths.sockets(), g.paths.pidfile))


def test_qemu_rejecting_its_arguments_shows_qemus_message(make_guest):
    g = make_guest("{}", spec_kw={"extra_args": ("-device", "no-such-device-model")})

    async def body():
        with pytest.raises(LaunchError) as ei:
            await g.launch()
        return ei.value

    err = asyncio.run(body())
    assert err.exitcode == 1
    assert "no-such-device-model" in err.stderr_tail
    assert "qemu said" in str(err) and "no-such-device-model" in str(err)
    assert not any(p.exists() for p in g.paths.sockets())


def test_missing_kernel_is_refused_before_anything_runs(make_guest, tmp_path):
    boot = Boot(str(tmp_path / "no-vmlinuz"), str(tmp_path / "no-initrd"), builtin=True)
    g = make_guest("{}", boot=boot)

    async def body():
        with pytest.raises(LaunchError, match="kernel .* is missing"):
            await g.launch()

    asyncio.run(body())
    assert g.proc is None


def test_second_launch_of_the_same_guest_fails_loudly(make_guest, virt_host):
    g = make_guest("{}")

    async def body():
        async with running(g):
            from consolidator.vm.guest import Guest
            twin = Guest(g.spec)
            with pytest.raises(ConflictError, match="already running"):
                await twin.launch()
            assert twin.proc is None
            assert await g.qmp.status() == "running"

    asyncio.run(body())


def test_crash_is_seen_within_a_second_and_poweroff_is_clean(make_guest):
    g = make_guest("{}")

    async def body():
        async with running(g):
            os.kill(g.pid, signal.SIGKILL)
            t = time.monotonic()
            ex = await g.wait_exit(timeout=5)
            assert time.monotonic() - t < 1.0
            assert ex.signal == signal.SIGKILL and not ex.clean
            assert g.state is Runstate.CRASHED
        await g.cleanup()
        async with running(g):             # a crashed guest can be launched again
            await (await g.agent()).request("poweroff")
            ex = await g.wait_exit(timeout=20)
            assert ex.exitcode == 0 and ex.clean
            assert g.state is Runstate.STOPPED

    asyncio.run(body())


def test_image_build_cli_is_reproducible(tmp_path, tiny_image):
    import json
    import sys
    cache = tmp_path / "cache"
    cache.mkdir()
    unpacked = tiny_image.dir.parent / "debian-cloud"
    if unpacked.exists():                     # reuse the kernel the session already fetched
        (cache / "debian-cloud").symlink_to(unpacked)
    env = {**os.environ, "CONSOLIDATOR_IMAGE_CACHE": str(cache)}
    cmd = [sys.executable, "-m", "consolidator", "--state-dir", str(tmp_path / "st"), "image"]

    def run(*args: str) -> str:
        res = subprocess.run(cmd + list(args), env=env, capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 0, res.stderr
        return res.stdout

    t = time.monotonic()
    first = run("build")
    assert time.monotonic() - t < 30
    second = run("build", "--force")
    assert first.split(" modules")[0] == second.split(" modules")[0]   # same name and sha256
    (img,) = json.loads(run("list", "--json"))
    sha = img["outputs"]["initrd.cpio"]["sha256"]
    assert f"initrd sha256 {sha[:16]}" in first
    if unpacked.exists():                     # same inputs as the session's image: same bytes
        assert sha == tiny_image.manifest["outputs"]["initrd.cpio"]["sha256"]
    run("rm", Path(img["dir"]).name)
    assert not Path(img["dir"]).exists()


def test_concurrent_builds_of_one_image_share_one_result(tmp_path, tiny_image):
    """apply starts guests in parallel and each may find the image missing: the builds
    must serialise on the cache, not trip over each other's temporary directories."""
    from concurrent.futures import ThreadPoolExecutor
    cache = tmp_path / "cache"
    cache.mkdir()
    unpacked = tiny_image.dir.parent / "debian-cloud"
    if unpacked.exists():
        (cache / "debian-cloud").symlink_to(unpacked)
    with ThreadPoolExecutor(4) as pool:
        built = list(pool.map(lambda _: build_tiny(cache), range(4)))
    assert len({b.dir for b in built}) == 1
    assert len({b.manifest["outputs"]["initrd.cpio"]["sha256"] for b in built}) == 1
    assert [p.name for p in cache.glob("tiny-*")] == [built[0].dir.name]
    assert not list(cache.glob(".*.tmp"))
    assert built[0].initrd.stat().st_size == built[0].manifest["outputs"]["initrd.cpio"]["size"]
