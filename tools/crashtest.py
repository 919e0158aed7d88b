#!/usr/bin/env python3
"""Crash injection: SIGKILL the supervisor at a random point of a command, then run the
next command and check that the fleet's invariants hold. Seeded: a failing seed prints
itself, and ``--seed N`` runs it again.

Each seed picks one command and a moment in it, both from the seed:

  create   apply, adding a guest            change   apply, a live change (shares)
  restart  apply --allow-restart, memory    replace  apply --allow-restart, another root
  prune    apply --prune, removing a guest            disk image for the plain guest
  destroy  destroy (disks kept)             snapshot snapshot create of the disk guest
  backup   backup of the disk guest         restore  restore --yes of the disk guest

The supervisor is killed (SIGKILL, the worst case: no cleanup at all) after a delay drawn
from [0, what the command takes here x --scale], if the command is still running. Then ``apply --prune
--allow-restart`` with the inventory as the seed wants it, and the invariants:

  - the fleet converges: apply succeeds, a second plan has nothing to do, every guest runs;
  - no guest runs twice: one QEMU per guest (found by its UUID, unique per state dir);
  - nothing is left over: no QEMU, netns or cgroup of a guest the inventory no longer has;
  - the data disk's checksum is what was written at the start (read in the guest);
  - the replaced guest's overlay is on the root disk of the image it now names;
  - every backup verifies (``backup verify``), and the history opens.

Run as root: python tools/crashtest.py [--seeds 50] [--first N] [--scale 1.0]
The CI runs 10 seeds (tests/integration/test_crash.py) with the same code.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools.fleetdir import FleetDir  # noqa: E402

OPS = ("create", "change", "restart", "replace", "prune", "destroy", "snapshot", "backup",
       "restore")
#: about how long each command takes here (s): the kill falls within it, the CLI's own
#: start (0.3 s) included, so a kill may also land before the supervisor hears of it
TAKES = {"create": 3.0, "change": 0.8, "restart": 3.0, "replace": 3.0, "prune": 1.2,
         "destroy": 1.8,
         "snapshot": 1.2, "backup": 1.5, "restore": 2.5}

FLEET = """
instance: {inst}
host: {{fabric_netns: {inst}-fab, metrics: {{enabled: false}}}}
images:
  ra: {{builtin: tiny, disk: ./root-a.raw}}
  rb: {{builtin: tiny, disk: ./root-b.raw}}
guests:
  disk:
    memory: {{max: {mem}MiB, min: 96MiB}}
    cpu: {{shares: {shares}}}
    disks: [{{size: 64MiB, name: data}}]
  plain: {{memory: {{max: 128MiB}}, image: {image}}}
{extra}"""
EXTRA = "  extra: {memory: {max: 128MiB}}\n"


@dataclass
class Wanted:
    """The inventory as the seeds so far want it."""
    extra: bool = False
    shares: int = 1000
    mem: int = 160
    image: str = "ra"       # plain's root disk: another image's disk replaces the guest

    def text(self, inst: str) -> str:
        return FLEET.format(inst=inst, mem=self.mem, shares=self.shares, image=self.image,
                            extra=EXTRA if self.extra else "")

    def guests(self) -> set[str]:
        return {"disk", "plain"} | ({"extra"} if self.extra else set())


@dataclass
class Harness(FleetDir):
    inst: str = field(default_factory=lambda: "k" + uuid.uuid4().hex[:7])
    wanted: Wanted = field(default_factory=Wanted)
    checksum: str | None = None
    log: list[str] = field(default_factory=list)

    def sh(self, guest: str, command: str) -> str:
        from consolidator.daemon import protocol
        with protocol.connect(self.state, start=True) as c:
            reply = c.call("agent", name=guest, command="sh", arg=command,
                           timeout=60)["reply"]
        fields = dict(p.split("=", 1) for p in reply.split() if "=" in p)
        if fields.get("rc") != "0":
            raise AssertionError(f"{guest}: {command}: {reply}")
        return base64.b64decode(fields.get("out", "")).decode()

    def data_sum(self) -> str:
        return self.sh("disk", "dd if=/dev/vda bs=1M count=8 2>/dev/null | sha256sum")\
            .split()[0]

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self._root_disks()
        self.inventory.write_text(self.wanted.text(self.inst))
        self.cli("apply")
        self.sh("disk", "dd if=/dev/urandom of=/dev/vda bs=1M count=8 conv=fsync "
                        "2>/dev/null")
        self.checksum = self.data_sum()
        self.cli("backup", "disk")               # restore always has one to go back to

    def _root_disks(self) -> None:
        """Two ext4 root disks holding tiny's tree, one per image: switching plain from
        one image to the other replaces it (a new overlay on the other base)."""
        from consolidator.vm.image import busybox_path, guest_tree
        tree = self.root / "rootfs"
        guest_tree(busybox_path(), []).write_dir(tree)
        for name in ("root-a.raw", "root-b.raw"):
            subprocess.run(["mke2fs", "-q", "-t", "ext4", "-d", str(tree),
                            str(self.root / name), "32M"], check=True, capture_output=True)

    def teardown(self) -> list[str]:
        """Destroy everything; what is left of the instance anywhere (must be nothing)."""
        self.cli("destroy", "--yes", "--purge", check=False, timeout=120)
        pid = self.supervisor_pid()
        if pid:
            os.kill(pid, signal.SIGKILL)
        from consolidator.daemon import teardown
        from consolidator.vm.identity import Registry
        left = leftovers(self.inst)
        teardown.collect(teardown.Scope(self.inst, f"{self.inst}-fab"))
        Registry().release_state(str(self.state.resolve()))
        return left

    # ------------------------------------------------------------------- seeds
    def command(self, op: str, seed: int) -> list[str]:
        w = self.wanted
        if op == "create":
            w.extra = True
        elif op == "prune":
            w.extra = False
        elif op == "change":
            w.shares = 1000 if w.shares != 1000 else 2000
        elif op == "restart":
            w.mem = 160 if w.mem != 160 else 192
        elif op == "replace":
            w.image = "rb" if w.image == "ra" else "ra"
        self.inventory.write_text(w.text(self.inst))
        return {"create": ["apply"], "change": ["apply"],
                "restart": ["apply", "--allow-restart"],
                "replace": ["apply", "--allow-restart"], "prune": ["apply", "--prune"],
                "destroy": ["destroy", "--yes"],
                "snapshot": ["snapshot", "create", "disk", "--tag", f"s{seed}"],
                "backup": ["backup", "disk"],
                "restore": ["restore", "disk", "--yes"]}[op]

    def seed(self, seed: int, scale: float = 1.0) -> list[str]:
        """One seed: a command killed at a random point, then the invariants. Returns
        what failed (empty: the seed passed)."""
        rng = random.Random(seed)
        op = rng.choice(OPS)
        delay = rng.uniform(0.0, TAKES[op] * scale)
        args = self.command(op, seed)
        t0 = time.monotonic()
        proc = subprocess.Popen(self.argv(*args), env=self.env(), cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        time.sleep(delay)
        killed = None
        if proc.poll() is None:
            pid = self.supervisor_pid()
            if pid:
                os.kill(pid, signal.SIGKILL)
                killed = round(time.monotonic() - t0, 2)
        try:
            proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        what = f"seed {seed}: {op}, supervisor " + \
            (f"killed at {killed}s" if killed is not None else
             f"not killed (the command ended before {delay:.2f}s)")
        self.log.append(what)
        return [f"{what}: {f}" for f in self.check()]

    # -------------------------------------------------------------- invariants
    def check(self) -> list[str]:
        fails: list[str] = []
        res = self.cli("apply", "--prune", "--allow-restart", check=False)
        if res.returncode != 0:
            fails.append(f"apply did not converge (exit {res.returncode}): "
                         f"{(res.stdout + res.stderr)[-600:]}")
            return fails
        plan = self.cli("plan", check=False).stdout
        if not re.search(r"Plan: 0 to create, 0 to start, 0 to change live, 0 to restart, "
                         r"0 to replace, 0 to remove", plan):
            fails.append(f"a second plan still has work: {plan[-400:]}")
        status = json.loads(self.cli("status", "--json").stdout)
        guests = {g["name"]: g for g in status["guests"]}
        if set(guests) != self.wanted.guests():
            fails.append(f"guests {sorted(guests)} != wanted {sorted(self.wanted.guests())}")
        for n, g in guests.items():
            if g["state"] != "running":
                fails.append(f"{n} is {g['state']}")
        fails += self._one_qemu_each(guests)
        fails += self._plain_on_its_image()
        fails += self._nothing_left_over(set(guests))
        try:
            got = self.data_sum()
            if got != self.checksum:
                fails.append(f"data disk checksum {got[:12]} != {self.checksum[:12]}")
        except AssertionError as e:
            fails.append(f"data disk unreadable: {e}")
        ver = self.cli("backup", "verify", check=False)
        if ver.returncode != 0:
            fails.append(f"backup verify failed: {(ver.stdout + ver.stderr)[-400:]}")
        from consolidator.report.history import open_db
        if (self.state / "history.sqlite").exists():
            try:
                open_db(self.state / "history.sqlite", readonly=True).close()
            except Exception as e:  # noqa: BLE001 - any failure to open is the finding
                fails.append(f"history does not open: {e}")
        return fails

    def _plain_on_its_image(self) -> list[str]:
        """plain's overlay is on the disk of the image the inventory names now."""
        want = self.root / f"root-{self.wanted.image[1]}.raw"
        info = subprocess.run(["qemu-img", "info", "-U", "--output=json",
                               str(self.state / "guests" / "plain" / "disk.qcow2")],
                              capture_output=True, text=True)
        try:
            backing = json.loads(info.stdout).get("backing-filename")
        except ValueError:
            return [f"plain's overlay is unreadable: {info.stderr.strip()}"]
        return [] if backing == str(want) else \
            [f"plain's overlay is on {backing}, not {want}"]

    def _one_qemu_each(self, guests: dict[str, dict]) -> list[str]:
        import psutil
        from consolidator.vm.qemu import guest_uuid
        fails = []
        for n in guests:
            u = guest_uuid(self.state / "guests" / n)
            found = [p.pid for p in psutil.process_iter(["cmdline"])
                     if p.info["cmdline"] and u in p.info["cmdline"]]
            if len(found) != 1:
                fails.append(f"{n}: {len(found)} QEMUs run ({found})")
        return fails

    def _nothing_left_over(self, guests: set[str]) -> list[str]:
        """No kernel object or process of a guest the inventory no longer has."""
        gone = {"extra"} - guests
        left = [x for x in leftovers(self.inst)
                if any(re.search(rf"\b{g}\b", x) for g in gone)]
        return [f"left over of a removed guest: {x}" for x in left]


def leftovers(instance: str) -> list[str]:
    """Every kernel object and process of the instance, described."""
    from consolidator.daemon import teardown
    return [x.describe() for x in teardown.scan(teardown.Scope(instance, f"{instance}-fab"))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seeds", type=int, default=50)
    ap.add_argument("--first", type=int, default=1)
    ap.add_argument("--seed", type=int, help="run this seed alone (on a fresh fleet)")
    ap.add_argument("--scale", type=float, default=1.0,
                    help="kill within this multiple of what the command takes")
    a = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root")
    seeds = [a.seed] if a.seed is not None else list(range(a.first, a.first + a.seeds))
    h = Harness(Path(tempfile.mkdtemp(prefix="crashtest-")))
    failed: list[str] = []
    t0 = time.monotonic()
    try:
        h.setup()
        for s in seeds:
            fails = h.seed(s, a.scale)
            print(h.log[-1] + (": ok" if not fails else ": FAILED"), flush=True)
            for f in fails:
                print("  " + f, flush=True)
            failed += fails
    finally:
        left = h.teardown()
        if not left:
            shutil.rmtree(h.root, ignore_errors=True)
    killed = sum("killed at" in x for x in h.log)
    print(f"\n{len(seeds)} seeds in {time.monotonic() - t0:.0f}s, {killed} kills, "
          f"{len(failed)} failures; left over after destroy: {left or 'nothing'}")
    if failed or left:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
