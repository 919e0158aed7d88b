"""The backup and I/O figures the supervisor's Prometheus endpoint serves (from a plain
reading)."""

from __future__ import annotations

from consolidator.daemon.metrics import FleetCollector, Reading


def test_backup_age_and_dir_space_are_served():
    r = Reading(instance="prod", budget=None, guests=(), snapshot=None, weights={},
                host_state=None, ticks=0, now=1000.0,
                backups={"last": {"db": {"id": "db/x", "at": 400.0, "kind": "full"}},
                         "failures": {}, "usage": {"bytes": 123, "fs_free": 456}})
    fams = {f.name: f for f in FleetCollector(lambda: r).collect()}
    age = fams["consolidator_guest_backup_age_seconds"].samples[0]
    assert age.labels == {"fleet": "prod", "guest": "db"} and age.value == 600.0
    last = fams["consolidator_guest_backup_last_success_timestamp_seconds"].samples[0]
    assert last.value == 400.0
    assert fams["consolidator_backup_dir_bytes"].samples[0].value == 123
    assert fams["consolidator_backup_dir_free_bytes"].samples[0].value == 456


def test_no_backups_no_backup_metrics():
    r = Reading(instance="prod", budget=None, guests=(), snapshot=None, weights={},
                host_state=None, ticks=0)
    names = {f.name for f in FleetCollector(lambda: r).collect()}
    assert not any("backup" in n for n in names)


def test_io_counters_and_rates_are_served():
    from consolidator.sched.observe import GuestObs, HostObs, Snapshot
    o = GuestObs("web", disk_rd=10.0, disk_wr=30.0, disk_iops=2.0, net_rx=5.0, net_tx=7.0,
                 disk_bytes=(4096, 1 << 20), disk_ops=(1, 256), net_bytes=(100, 200))
    bare = GuestObs("db")                       # no disk, no NIC: no sample
    snap = Snapshot(1.0, 1.0, HostObs(0, 0, 0.0, 0.0, 0.0, None), {"web": o, "db": bare})
    r = Reading(instance="prod", budget=None, guests=(), snapshot=snap, weights={},
                host_state=None, ticks=0)
    fams = {f.name: f for f in FleetCollector(lambda: r).collect()}
    got = {n: [(s.labels["guest"], s.value) for s in fams[n].samples]
           for n in ("consolidator_guest_disk_written_bytes",
                     "consolidator_guest_disk_operations",
                     "consolidator_guest_net_transmitted_bytes",
                     "consolidator_guest_disk_bytes_per_second")}
    assert got == {"consolidator_guest_disk_written_bytes": [("web", 1 << 20)],
                   "consolidator_guest_disk_operations": [("web", 257)],
                   "consolidator_guest_net_transmitted_bytes": [("web", 200)],
                   "consolidator_guest_disk_bytes_per_second": [("web", 40.0)]}


def test_ksm_counters_and_each_guest_s_part_are_served():
    from consolidator.sched.ksm import KsmObs
    from consolidator.sched.observe import GuestObs, HostObs, Snapshot
    k = KsmObs(1.0, 1, 160, 20, 1000, 3000, 4, 2.5, 10_000)
    host = HostObs(0, 0, 0.0, 0.0, 0.0, None, ksm=k, ksm_cpu=0.012)
    snap = Snapshot(1.0, 1.0, host, {"a": GuestObs("a", ksm_pages=2000,
                                                   ksm_saved=1500 * 4096),
                                     "b": GuestObs("b")})
    r = Reading(instance="prod", budget=None, guests=(), snapshot=snap, weights={},
                host_state=None, ticks=0)
    fams = {f.name: f for f in FleetCollector(lambda: r).collect()}
    one = {n: fams[n].samples[0].value for n in (
        "consolidator_host_ksm_pages_sharing", "consolidator_host_ksm_saved_bytes",
        "consolidator_host_ksm_running", "consolidator_host_ksmd_cpu_seconds",
        "consolidator_host_ksmd_cpu_cores")}
    assert one == {"consolidator_host_ksm_pages_sharing": 3000,
                   "consolidator_host_ksm_saved_bytes": 3000 * 4096,
                   "consolidator_host_ksm_running": 1.0,
                   "consolidator_host_ksmd_cpu_seconds": 2.5,
                   "consolidator_host_ksmd_cpu_cores": 0.012}
    saved = [(s.labels["guest"], s.value)
             for s in fams["consolidator_guest_ksm_saved_bytes"].samples]
    assert saved == [("a", 1500 * 4096)]           # b: not known, no sample
    # no KSM in the kernel: no KSM family at all
    bare = Snapshot(1.0, 1.0, HostObs(0, 0, 0.0, 0.0, 0.0, None), {})
    r2 = Reading(instance="prod", budget=None, guests=(), snapshot=bare, weights={},
                 host_state=None, ticks=0)
    assert not [f for f in FleetCollector(lambda: r2).collect() if "ksm" in f.name]
