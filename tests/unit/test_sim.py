"""The simulator's headline results, kept from regressing (pure, about a second)."""

from __future__ import annotations

from consolidator.sched.sim import table


def test_policy_beats_the_baselines():
    rows = table()
    by = {(r["trace"], r["policy"]): r for r in rows}
    ours = "consolidator"
    for trace in ("steady", "leak", "diurnal", "cache", "host-pressure"):
        assert by[(trace, ours)]["ooms"] == 0, trace
    for trace in ("burst", "leak"):
        r = by[(trace, ours)]
        for base in ("oVirt MoM", "Proxmox autoballoon"):
            b = by[(trace, base)]
            ok = b["reaction_s"] is None or r["reaction_s"] * 5 <= b["reaction_s"]
            assert ok, (trace, base)
            assert r["ooms"] <= b["ooms"] and r["pressure_s"] <= b["pressure_s"]
    for trace in ("steady", "burst", "leak", "cache", "host-pressure"):
        for base in ("oVirt MoM", "Proxmox autoballoon"):
            assert by[(trace, ours)]["reclaimed_mib"] >= by[(trace, base)]["reclaimed_mib"]
    # no churn on a steady fleet: a handful of moves to settle, then nothing
    assert by[("steady", ours)]["changes"] < 100
