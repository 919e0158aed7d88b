"""A reading that fails is named in the snapshot (status shows it) and logged when it
starts and stops failing: never dropped in silence."""

from __future__ import annotations

import asyncio

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
            raise QMPError("no reply", error_class="Timeout")
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
        "guest stats: Timeout: no reply",
        "cgroup usage: CgroupError: cannot read cgroup of web")
    assert again.guests["web"].errors == snap.guests["web"].errors
    assert healed.guests["web"].errors == () and healed.guests["web"].cgroup_memory == 64 << 20
    events = [e["event"] for e in logs]
    assert events == ["observe.reading_failed", "observe.reading_recovered"]
