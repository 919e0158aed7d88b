"""A reading that fails is named in the snapshot (status shows it) and logged when it
starts and stops failing: never dropped in silence."""

from __future__ import annotations

import asyncio

import pytest
from structlog.testing import capture_logs

from consolidator.errors import CgroupError, QMPError
from consolidator.hostfacts import HostFacts
from consolidator.model import parse_fleet
from consolidator.sched.cgroup import CgroupUsage
from consolidator.sched.observe import Observer, Tracked

FLEET = parse_fleet("guests: {web: {}}\n", "t.yaml", HostFacts(cpus=(0, 1),
                                                              memory_total=8 << 30))


class Probe:
    """A guest that is not a QEMU: no pid to read, stats that fail as asked."""

    pid = None
    balloon_actual = 256 << 20

    def __init__(self, stats_error: bool = False) -> None:
        self.stats_error = stats_error

    def balloon_range(self, since: float):
        return None

    async def guest_stats(self):
        if self.stats_error:
            raise QMPError("no reply", error_class="GenericError")
        return None


def observe(obs: Observer, usage, probe: Probe):
    return asyncio.run(obs.observe([Tracked("web", FLEET.guests["web"], probe)], usage))


def test_failing_readings_are_named_logged_once_and_cleared():
    broken = True

    def usage(name: str) -> CgroupUsage:
        if broken:
            raise CgroupError(f"cannot read cgroup of {name}")
        return CgroupUsage(1_000_000, 64 << 20)

    obs = Observer(ncpu=2)
    with capture_logs() as logs:
        snap = observe(obs, usage, Probe(stats_error=True))
        again = observe(obs, usage, Probe(stats_error=True))
        broken = False
        healed = observe(obs, usage, Probe())
    assert snap.guests["web"].errors == (
        "guest stats: GenericError: no reply",
        "cgroup usage: CgroupError: cannot read cgroup of web")
    assert again.guests["web"].errors == snap.guests["web"].errors
    assert healed.guests["web"].errors == () and healed.guests["web"].cgroup_memory == 64 << 20
    events = [e["event"] for e in logs]
    assert events == ["observe.reading_failed", "observe.reading_recovered"]


class Stopped(Probe):
    """A QEMU that stops answering (SIGSTOP) and later answers again (SIGCONT)."""

    def __init__(self) -> None:
        super().__init__()
        self.stopped = False
        self.asked = 0
        self.pinged = 0

    async def _answer(self):
        while self.stopped:
            await asyncio.sleep(0.01)

    async def guest_stats(self):
        self.asked += 1
        await self._answer()
        return None

    async def ping(self):
        self.pinged += 1
        await self._answer()


def test_a_guest_that_stops_answering_is_left_alone_then_asked_again():
    """The loop waits for it once (``answer_within``), then not at all: a ping of its
    own, off the tick, says when it answers again."""
    import time

    async def go():
        probe = Stopped()
        obs = Observer(ncpu=2)
        obs.answer_within = 0.2
        tracked = [Tracked("web", FLEET.guests["web"], probe)]
        first = await obs.observe(tracked, None)
        assert first.guests["web"].unresponsive_s is None and probe.asked == 1
        probe.stopped = True
        with capture_logs() as logs:
            t0 = time.monotonic()
            hung = await obs.observe(tracked, None)             # waits answer_within once
            ticks = [await obs.observe(tracked, None) for _ in range(5)]
            took = time.monotonic() - t0
            assert 0.2 <= took < 0.5, took                     # the later ticks never wait
            assert probe.asked == 2
            assert "no answer within 0.2s" in hung.guests["web"].errors[0]
            assert all(t.guests["web"].unresponsive_s is not None and t.guests["web"].stale
                       for t in ticks)
            probe.stopped = False
            await asyncio.sleep(0.05)                          # the ping answers
            back = await obs.observe(tracked, None)
        assert back.guests["web"].unresponsive_s is None and probe.asked == 3
        assert probe.pinged >= 1
        assert [e["event"] for e in logs if "responsive" in e["event"]] == \
            ["observe.unresponsive", "observe.responsive_again"]
        obs.close()
    asyncio.run(go())


class Counting(Probe):
    """A guest whose stats were updated by it ``age`` seconds before each ask."""

    def __init__(self, age: float = 0.5) -> None:
        super().__init__()
        self.asked = 0
        self.age = age

    async def guest_stats(self):
        import time
        from types import SimpleNamespace
        self.asked += 1
        return SimpleNamespace(last_update=time.time() - self.age, total=256 << 20,
                               available=200 << 20, free=150 << 20, disk_caches=20 << 20,
                               major_faults=0, swap_in=0)


def test_a_guest_that_hardly_ran_is_not_asked_again_and_its_answer_stands():
    cpu = [0]
    probe = Counting()
    obs = Observer(ncpu=2)

    def usage(name: str) -> CgroupUsage:
        return CgroupUsage(cpu[0], 64 << 20)

    first = observe(obs, usage, probe)
    assert probe.asked == 1 and not first.guests["web"].stale
    cpu[0] += 5_000_000                        # 5 ms of CPU: too little to move memory
    quiet = [observe(obs, usage, probe) for _ in range(3)]
    assert probe.asked == 1 and obs.stats_asked == 1
    # the answer stands, judged as of when it was given: still fresh, same figures
    assert all(not q.guests["web"].stale and q.guests["web"].available == 200 << 20
               for q in quiet)
    cpu[0] += 20_000_000                       # it ran 25 ms since it was asked
    observe(obs, usage, probe)
    assert probe.asked == 2


def test_a_quiet_guest_is_asked_again_after_refresh_after_and_a_hung_one_shows_stale():
    probe = Counting(age=30)                   # a guest that stopped updating its stats
    obs = Observer(ncpu=2, refresh_after=0.0)

    def usage(name: str) -> CgroupUsage:
        return CgroupUsage(0, 64 << 20)        # no CPU at all: hung, or idle

    snaps = [observe(obs, usage, probe) for _ in range(3)]
    assert probe.asked == 3
    assert all(s.guests["web"].stale for s in snaps)


def test_without_a_cgroup_reading_a_guest_is_asked_every_tick():
    probe = Counting()
    obs = Observer(ncpu=2)
    for _ in range(3):
        observe(obs, None, probe)
    assert probe.asked == 3


def test_a_quiet_guest_whose_balloon_moved_is_asked_again():
    """Its working set is its stats against the balloon they were taken with: a balloon
    that moved since makes the last answer wrong, however little the guest ran."""
    probe = Counting()
    obs = Observer(ncpu=2)

    def usage(name: str) -> CgroupUsage:
        return CgroupUsage(0, 64 << 20)

    observe(obs, usage, probe)
    observe(obs, usage, probe)
    assert probe.asked == 1
    probe.balloon_actual = 200 << 20
    observe(obs, usage, probe)
    assert probe.asked == 2


DISKED = parse_fleet("networks: {lan: {subnet: 10.9.0.0/24}}\n"
                     "guests: {web: {disks: [{size: 64MiB}], nics: [{network: lan}]}}\n",
                     "t.yaml", HostFacts(cpus=(0, 1), memory_total=8 << 30))


class Disked(Probe):
    """A guest with a disk whose counters move as the test says."""

    def __init__(self) -> None:
        super().__init__()
        self.written = 0
        self.asked = 0

    async def disk_counters(self):
        from consolidator.vm.qmp import DiskCounters
        self.asked += 1
        return {"data-data0": DiskCounters(0, self.written, 0, self.written >> 20)}


def test_disk_and_nic_rates_and_a_guest_that_did_not_run_is_not_asked():
    import time
    cpu, probe, nic = [0], Disked(), [(0, 0, 0, 0)]
    obs = Observer(ncpu=2)

    def usage(name: str) -> CgroupUsage:
        return CgroupUsage(cpu[0], 64 << 20)

    def snap():
        return asyncio.run(obs.observe([Tracked("web", DISKED.guests["web"], probe)], usage,
                                       lambda: {"web": nic[0]})).guests["web"]
    first = snap()
    assert first.disk_wr is None and first.disk_bytes == (0, 0)      # no interval yet
    t0 = time.monotonic()
    time.sleep(0.2)
    cpu[0] += 50_000_000                       # it ran: asked again
    probe.written += 10 << 20
    nic[0] = (1000, 3000, 10, 30)
    busy = snap()
    dt = time.monotonic() - t0
    assert busy.disk_wr == pytest.approx((10 << 20) / dt, rel=0.2)
    assert busy.disk_iops == pytest.approx(10 / dt, rel=0.2)
    assert busy.net_rx == pytest.approx(1000 / dt, rel=0.2)
    assert busy.net_tx == pytest.approx(3000 / dt, rel=0.2)
    assert busy.disk_bytes == (0, 10 << 20) and busy.net_bytes == (1000, 3000)
    idle = snap()                              # no CPU since: not asked, no I/O
    assert probe.asked == 2 and idle.disk_wr == 0.0 and idle.disk_bytes == (0, 10 << 20)
