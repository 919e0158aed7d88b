"""The backup figures the supervisor's Prometheus endpoint serves (from a plain reading)."""

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
