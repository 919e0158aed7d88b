#!/usr/bin/env python3
"""Replay the memory traces through consolidator's policy, oVirt MoM's and Proxmox's
autoballoon (see consolidator/sched/sim.py for the model and the baselines' rules) and
print the comparison as a markdown table.  python tools/sim/run.py [--json]"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from consolidator.sched.sim import scenarios, table  # noqa: E402


def main() -> None:
    rows = table()
    if "--json" in sys.argv:
        print(json.dumps(rows, indent=2))
        return
    desc = {s.name: s.description for s in scenarios()}
    print("| trace | policy | guest-s under pressure | OOM events | reaction to the burst | "
          "idle memory reclaimed | balloon changes |")
    print("|---|---|---|---|---|---|---|")
    last = None
    for r in rows:
        trace = f"**{r['trace']}**: {desc[r['trace']]}" if r["trace"] != last else ""
        last = r["trace"]
        react = "-" if r["reaction_s"] is None else f"{r['reaction_s']} s"
        print(f"| {trace} | {r['policy']} | {r['pressure_s']:.0f} | {r['ooms']} | {react} | "
              f"{r['reclaimed_mib']} MiB | {r['changes']} |")


if __name__ == "__main__":
    main()
