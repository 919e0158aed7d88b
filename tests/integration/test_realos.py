"""Real operating systems nobody here wrote: Debian 12 (UEFI, q35, virtio, cloud-init),
Debian 11 (BIOS, pc, SATA, e1000, DHCP only, VGA) and Debian's installer from an ISO,
through the real CLI, the supervisor, dnsmasq and the QEMU guest agent.

The Debian disks come from ``consolidator image build debian`` (CI builds them before
the suite; they are cached under the test image cache across runs on one machine). The
installer ISO is made from Debian's netboot package with grub-mkrescue, BIOS and UEFI.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import zlib
from pathlib import Path
from typing import Any, Callable

import pytest

from consolidator.net import netns as ns
from consolidator.vm.osimage import build_debian
from consolidator.vm.qga import GuestAgent

from .conftest import IMAGE_CACHE
from .env import ROOT, CliFleet, cli_fleet, leftovers

pytestmark = pytest.mark.usefixtures("need_root", "need_qemu", "tiny_image")

NETBOOT = Path("/usr/lib/debian-installer/images/12/amd64/text/debian-installer/amd64")


def _debian(release: str, firmware: str) -> Path:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    return build_debian(IMAGE_CACHE, release, firmware).disk


@pytest.fixture(scope="session")
def bookworm_uefi() -> Path:
    return _debian("bookworm", "uefi")


@pytest.fixture(scope="session")
def bullseye_bios() -> Path:
    return _debian("bullseye", "bios")


@pytest.fixture(scope="session")
def installer_iso(tmp_path_factory) -> Path:
    """Debian 12's netboot installer (text frontend) as an ISO booting BIOS and UEFI."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    tree = tmp_path_factory.mktemp("iso")
    (tree / "boot" / "grub").mkdir(parents=True)
    for f in ("linux", "initrd.gz"):
        shutil.copy(NETBOOT / f, tree / f)
    (tree / "boot" / "grub" / "grub.cfg").write_text(
        'set timeout=0\nmenuentry "Debian installer" {\n'
        "  linux /linux vga=788 --- quiet\n  initrd /initrd.gz\n}\n")
    iso = tree.parent / "installer.iso"
    subprocess.run(["grub-mkrescue", "-o", str(iso), str(tree)], check=True,
                   capture_output=True)
    return iso


# ------------------------------------------------------------------ helpers

def until(what: str, fn: Callable[[], Any], timeout: float, every: float = 2.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = fn()
            if last:
                return last
        except Exception as e:  # noqa: BLE001 - retried until the deadline
            last = e
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout:g}s (last: {last!r})")


def agent(f: CliFleet, guest: str) -> GuestAgent:
    return GuestAgent(guest, str(f.state / "guests" / guest / "run" / "agent.sock"))


def guest_run(f: CliFleet, guest: str, *argv: str, timeout: float = 60) -> tuple[int, str]:
    return asyncio.run(agent(f, guest).run(list(argv), timeout=timeout))


def fetch(netns: str, url: str) -> str:
    with ns.entered(netns):
        with urllib.request.urlopen(url, timeout=3) as r:
            return r.read().decode()


def png_pixels(data: bytes) -> tuple[int, int, list[tuple[int, int, int]]]:
    """A PNG as QEMU writes it (8-bit RGB or RGBA, no interlace) -> (w, h, pixels)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, w = 8, b"", 0
    h = ctype = 0
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            w, h, depth, ctype = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and ctype in (2, 6)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    bpp = 3 if ctype == 2 else 4
    raw, stride = zlib.decompress(idat), w * bpp
    rows: list[bytearray] = []
    prev = bytearray(stride)
    for y in range(h):
        ft, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if ft == 1:
                line[i] = (line[i] + a) & 255
            elif ft == 2:
                line[i] = (line[i] + b) & 255
            elif ft == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif ft == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(line)
        prev = line
    pixels = [tuple(r[i:i + 3]) for r in rows[::4] for i in range(0, stride, bpp * 4)]
    return w, h, pixels  # type: ignore[return-value]


def screenshot(f: CliFleet, guest: str) -> bytes:
    out = f.root / f"{guest}-{time.monotonic_ns()}.png"
    res = f.cli("screenshot", guest, "-o", str(out))
    assert "PNG" in res.stdout
    return out.read_bytes()


def colours(png: bytes) -> dict[tuple[int, int, int], float]:
    _, _, px = png_pixels(png)
    counts: dict[tuple[int, int, int], int] = {}
    for p in px:
        counts[p] = counts.get(p, 0) + 1
    return {k: v / len(px) for k, v in sorted(counts.items(), key=lambda kv: -kv[1])}


def event(f: CliFleet, guest: str, name: str) -> list[dict]:
    return [e for e in f.log(guest) if e.get("kind") == "event" and e.get("event") == name]


# --------------------------------------------------------- Debian 12, UEFI

HEAD = """
version: 1
instance: {inst}
host:
  fabric_netns: {inst}-fab
  image_roots: [@ROOT@]
  metrics: {{enabled: false}}
"""

DEB12 = HEAD + """images:
  deb12: {{disk: @DISK@, os: debian12, firmware: uefi}}
networks:
  front: {{subnet: 10.61.0.0/24, gateway: 10.61.0.1}}
guests:
  web:
    image: deb12
    machine: q35
    memory: {{max: 512MiB}}
    disks: [{{size: @SIZE@}}]
    nics: [{{network: front, ip: 10.61.0.10}}]
    cloud_init:
      user_data:
        write_files:
          - {{path: /srv/www/index.html, content: "hello from web\\n"}}
        runcmd:
          - [sh, -c, "cd /srv/www && nohup python3 -m http.server 8080 >/dev/null 2>&1 &"]
"""


@pytest.mark.timeout(1500)
def test_debian12_uefi_cloud_init_agent_and_a_data_disk(tmp_path, bookworm_uefi):
    text = DEB12.replace("@ROOT@", str(IMAGE_CACHE)).replace("@DISK@", str(bookworm_uefi))
    with cli_fleet(tmp_path, text.replace("@SIZE@", "1GiB")) as f:
        f.cli("apply", timeout=900)
        web = f.guests()["web"]
        assert (web["state"], web["ready"], web["firmware"], web["machine"]) == \
            ("running", "agent", "uefi", "q35")
        # READY came from the agent: the guest agent answers, and names the guest
        assert until("hostname from cloud-init",
                     lambda: asyncio.run(agent(f, "web").hostname()) == "web", 180)
        assert until("the page from the fabric", lambda: "hello from web" in fetch(
            f.fabric, "http://10.61.0.10:8080/"), 240, every=3)
        assert until("the agent's address in status", lambda: any(
            "10.61.0.10/24" in i["addresses"]
            for i in (f.guests()["web"]["agent"] or {}).get("interfaces", [])), 90)

        # the data disk: the inventory's size, and a file on it
        disk = "/dev/disk/by-id/virtio-data0"
        rc, out = guest_run(f, "web", "blockdev", "--getsize64", disk)
        assert (rc, out.strip()) == (0, str(1 << 30))
        rc, out = guest_run(f, "web", "sh", "-c", f"mkfs.ext4 -q {disk} && mkdir -p /data && "
                            f"mount {disk} /data && echo kept > /data/f && sync")
        assert rc == 0, out

        # a snapshot freezes its filesystems through qemu-ga (/ and /data; not the ESP), and a
        # backup holds the overlay, the data disk and the image's base once
        snap = json.loads(f.cli("snapshot", "create", "web", "--tag", "t1", "--json")
                          .stdout)["guests"][0]
        assert snap["kind"] == "frozen" and snap["filesystems_frozen"] >= 2, snap
        assert asyncio.run(agent(f, "web").execute("guest-fsfreeze-status")) == "thawed"
        b = json.loads(f.cli("backup", "web", "--json", timeout=300).stdout)["backups"][0]
        assert b["consistency"] == "frozen" and set(b["disks"]) == {"disk", "data-data0"}
        assert json.loads(f.cli("backup", "verify", "--json", timeout=300).stdout)["ok"]
        assert len(list((f.state / "backups" / "bases").glob("*.qcow2"))) == 1

        # growing it is live: no restart, and the guest sees the new size
        pid = f.guests()["web"]["pid"]
        f.write(text.replace("@SIZE@", "2GiB").format(inst=f.instance))
        res = f.cli("apply")
        assert "disks.data0.size" in res.stdout and "1 to change live" in res.stdout and \
            "0 to restart" in res.stdout, res.stdout
        assert f.guests()["web"]["pid"] == pid
        assert until("the grown disk inside", lambda: guest_run(
            f, "web", "blockdev", "--getsize64", disk)[1].strip() == str(2 << 30), 30, 1)

        # a stop goes through the agent, and the file is on the disk after it (read on
        # the host: a second boot of this guest would cost the suite a minute and a half)
        f.cli("stop", "web", timeout=180)
        stopped = event(f, "web", "stopped")[-1]
        assert "asked through the agent" in stopped["how"], stopped
        data = f.state / "guests" / "web" / "data-data0.qcow2"
        raw = tmp_path / "data0.raw"
        subprocess.run(["qemu-img", "convert", "-O", "raw", str(data), str(raw)], check=True)
        cat = subprocess.run(["debugfs", "-R", "cat /f", str(raw)], capture_output=True,
                             text=True, check=True)
        assert cat.stdout.strip() == "kept", cat
        raw.unlink()

        # shrinking is refused, with nothing applied
        f.write(text.replace("@SIZE@", "1GiB").format(inst=f.instance))
        res = f.cli("apply", check=False)
        assert res.returncode != 0 and "shrink" in res.stdout + res.stderr

        # destroy keeps the disk; --purge removes it
        f.cli("destroy", "--yes", timeout=180)
        assert data.exists() and (data.parent / "efivars.fd").exists()
        f.cli("destroy", "--yes", "--purge")
        assert not data.exists()
    assert leftovers(f.instance) == []


# ------------------------------------------------- Debian 11, legacy devices

DEB11 = HEAD + """images:
  deb11: {{disk: @DISK@}}
networks:
  lan: {{subnet: 10.62.0.0/24, gateway: 10.62.0.1}}
guests:
  old:
    image: deb11
    os: debian11
    firmware: bios
    machine: pc
    disk_bus: sata
    display: vga
    memory: {{max: 512MiB}}
    nics: [{{network: lan, ip: 10.62.0.20, model: e1000}}]
  db:
    memory: {{max: 128MiB}}
    nics: [{{network: lan, ip: 10.62.0.30}}]
"""


@pytest.mark.timeout(1200)
def test_debian11_bios_legacy_devices_dhcp_dns_and_a_screen(tmp_path, bullseye_bios):
    text = DEB11.replace("@ROOT@", str(IMAGE_CACHE)).replace("@DISK@", str(bullseye_bios))
    with cli_fleet(tmp_path, text) as f:
        f.cli("apply", timeout=900)
        g = f.guests()
        assert g["old"]["state"] == "running" and g["old"]["machine"] == "pc"
        # its address came by DHCP (no seed: nothing else could give it), and it answers
        assert until("the DHCP address in the agent's report", lambda: any(
            "10.62.0.20/24" in i["addresses"]
            for i in (f.guests()["old"]["agent"] or {}).get("interfaces", [])), 120)
        res = f.cli("agent", "db", "sh", "ping", "-c", "1", "-W", "3", "10.62.0.20")
        assert res.stdout.startswith("rc=0 "), res.stdout        # from the tiny guest db
        lease = (f.state / "networks" / "lan.leases").read_text()
        assert "10.62.0.20" in lease
        # and it resolves the other guest by name, from the network's dnsmasq
        rc, out = guest_run(f, "old", "getent", "hosts", "db")
        assert rc == 0 and "10.62.0.30" in out, out
        rc, out = guest_run(f, "old", "getent", "hosts", "db.lan")
        assert rc == 0 and "10.62.0.30" in out, out
        # its dnsmasq runs unprivileged, and comes back if it dies
        lan = f.status()["networks"][0]["dhcp"]
        assert lan["address"] == "10.62.0.1" and lan["hosts"] == 2
        import psutil
        assert psutil.Process(lan["pid"]).username() in ("dnsmasq", "nobody")
        os.kill(lan["pid"], 9)
        again = until("dnsmasq restarted", lambda: (lambda d: d if d["pid"] not in (
            None, lan["pid"]) else None)(f.status()["networks"][0]["dhcp"]), 20, 0.5)
        assert again["restarts"] == 1
        # the devices are the legacy ones the inventory asked for
        rc, out = guest_run(f, "old", "sh", "-c",
                            "readlink /sys/class/net/eth0/device/driver; ls /sys/block")
        assert "e1000" in out and "sda" in out and "vda" not in out, out

        # a screen: a PNG that is not blank, and a VNC port that speaks RFB
        shot = colours(screenshot(f, "old"))       # its text console: light on black
        assert len(shot) > 1, list(shot.items())[:3]
        vnc = subprocess.Popen([sys.executable, "-m", "consolidator", "vnc", "old"],
                               stdout=subprocess.PIPE, text=True, cwd=ROOT,
                               env={**os.environ, "CONSOLIDATOR_STATE_DIR": str(f.state)})
        try:
            line = vnc.stdout.readline()          # type: ignore[union-attr]
            port = int(line.split("127.0.0.1:")[1].split()[0])
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.settimeout(10)
                assert s.recv(12) == b"RFB 003.008\n"
        finally:
            vnc.terminate()
            vnc.wait(10)
    assert leftovers(f.instance) == []


# ------------------------------------------------------------- the installer

INSTALLER = HEAD + """images:
  installer: {{cdrom: @ISO@}}
guests:
  inst:
    image: installer
    firmware: @FW@
    display: vga
    ready: none
    boot: [cdrom, disk]
    memory: {{max: 512MiB}}
    disks: [{{size: 2GiB}}]
"""


@pytest.mark.timeout(600)
@pytest.mark.parametrize("firmware", ["bios", "uefi"])
def test_installer_from_iso_on_a_blank_disk(tmp_path, installer_iso, firmware):
    text = (INSTALLER.replace("@ROOT@", str(installer_iso.parent))
            .replace("@ISO@", str(installer_iso)).replace("@FW@", firmware))
    with cli_fleet(tmp_path, text) as f:
        f.cli("apply", timeout=300)
        first = screenshot(f, "inst")           # the firmware's own screen, or black

        def installer() -> bool:
            shot = colours(screenshot(f, "inst"))
            top, share = next(iter(shot.items()))
            # the text installer paints its blue backdrop over most of the screen
            return shot != colours(first) and top[2] > 120 and top[0] < 80 and share > 0.3
        assert until("the installer's screen", installer, 400, every=5)
    assert leftovers(f.instance) == []


# ------------------------------------------------------------- ready probes

PROBES = """
version: 1
instance: {inst}
host: {{fabric_netns: {inst}-fab, metrics: {{enabled: false}}}}
networks:
  lan: {{subnet: 10.63.0.0/24, gateway: 10.63.0.1}}
guests:
  web:
    ready: tcp:80
    memory: {{max: 128MiB}}
    nics: [{{network: lan, ip: 10.63.0.10}}]
  mute:
    ready: "serial:NEVER-PRINTED"
    ready_timeout: 8s
    memory: {{max: 128MiB}}
"""


@pytest.mark.timeout(300)
def test_a_probe_that_never_answers_fails_its_start_and_the_others_go_on(tmp_path):
    with cli_fleet(tmp_path, PROBES) as f:
        res = f.cli("apply", check=False)
        assert res.returncode == 1
        g = f.guests()
        # tcp:80: the busybox httpd of the tiny image accepted from the fabric
        assert g["web"]["state"] == "running" and g["web"]["ready"] == "tcp:80"
        assert g["mute"]["state"] == "crashed"
        failed = event(f, "mute", "start_failed")[-1]
        assert "not ready (serial:NEVER-PRINTED) within 8s" in failed["error"]
        assert failed["serial_tail"]                      # the last lines it printed

        # a dnsmasq outlives a supervisor killed outright (it dropped to its user, which
        # clears the parent-death signal); the next supervisor clears it from its cgroup
        import psutil
        old = f.status()["networks"][0]["dhcp"]["pid"]
        sup = f.supervisor_pid()
        os.kill(sup, 9)
        until("the supervisor gone", lambda: not psutil.pid_exists(sup), 10, 0.1)
        assert psutil.pid_exists(old)
        f.cli("start", "web", check=False)                # a new supervisor, the same fleet
        new = until("a new dnsmasq", lambda: f.status()["networks"][0]["dhcp"]["pid"], 20, 0.5)

        def gone(pid: int) -> bool:     # (an orphan's zombie waits for PID 1 to reap it)
            try:
                return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True
        assert new != old and until("the old dnsmasq gone", lambda: gone(old), 10, 0.2)
    assert leftovers(f.instance) == []
