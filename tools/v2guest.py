#!/usr/bin/env python3
"""Run the pure-cgroup-v2 tests inside a Debian 12 guest, on a real v2 kernel.

The development and CI hosts are hybrid (controllers on v1), so the tests marked
``v2host`` cannot run on them. This boots the project's own Debian 12 image (``consolidator
image build debian --release bookworm --firmware uefi``: systemd mounts pure cgroup v2
there; its kernel and initrd booted directly, with systemd's ``systemd.run=`` in place of
cloud-init), shares the repository and this interpreter's site-packages into it read-only
over 9p at the same paths, and runs ``pytest -m v2host`` in a systemd service with
``Delegate=yes``, as consolidator.service runs on a production host. The guest's own
python3 (3.11, like the host's) runs the host's installed packages.

    python tools/v2guest.py [pytest args...]      # default: tests/integration/test_cgroup_v2.py

It prints the guest's pytest output and exits with its exit code; the guest's console
and the run's files stay in --workdir when given. The guest has no network at all.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import sysconfig
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from consolidator.vm.accel import choose_accel, probe_kvm  # noqa: E402
from consolidator.vm.osimage import ESP_MIB, build_debian  # noqa: E402

CACHE = Path(os.environ.get("CONSOLIDATOR_IMAGE_CACHE", "/var/tmp/consolidator-test-images"))
DEFAULT_TESTS = ["tests/integration/test_cgroup_v2.py"]
UNIT = "consolidator-v2tests"
NOBODY = 65534


@dataclass
class Outcome:
    rc: int | None                   # pytest's exit code in the guest (None: never ran)
    output: str                      # pytest's output
    cgroup_mounts: str               # the guest's cgroup mounts, as it saw them
    results: dict[str, str] = field(default_factory=dict)     # test id -> passed/failed/...
    seconds: float = 0.0
    console: str = ""                # the guest's serial console (the end of it)


def site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"]).resolve()


def shares(site: Path) -> dict[str, Path]:
    """9p tag -> host directory to share read-only: the repository, and this interpreter's
    site-packages when they are not inside it."""
    return {"repo": ROOT} if ROOT in site.parents else {"repo": ROOT, "site": site}


def script(tests: list[str], dirs: dict[str, Path], site: Path) -> str:
    """Pure: what the guest runs once booted (from the kernel's command line, with the
    writable share already mounted at /run/v2out): mount the shares, run pytest in a
    delegated service, leave the results in the writable share."""
    mnt = "\n".join(f"mkdir -p {shlex.quote(str(p))} && mount -t 9p -o "
                    f"trans=virtio,version=9p2000.L,ro,msize=262144 {tag} "
                    f"{shlex.quote(str(p))}" for tag, p in dirs.items())
    path = f"{ROOT}:{site}"
    args = " ".join(shlex.quote(a) for a in ["-p", "no:cacheprovider", "-m", "v2host",
                                             "--junitxml=/run/v2out/junit.xml", *tests])
    return f"""#!/bin/sh
set -u
{{
{mnt}
grep cgroup /proc/self/mountinfo > /run/v2out/mounts
# this runs early in the boot (after basic.target): systemd-run --wait needs the bus
systemctl start dbus.service
systemd-run --unit={UNIT} --property=Delegate=yes --wait --pipe --collect --quiet \\
    --working-directory={shlex.quote(str(ROOT))} \\
    --setenv=PYTHONPATH={shlex.quote(path)} --setenv=PYTHONDONTWRITEBYTECODE=1 \\
    --setenv=HOME=/root \\
    python3 -m pytest {args} </dev/null > /run/v2out/pytest.log 2>&1
echo $? > /run/v2out/rc
}} > /run/v2out/script.log 2>&1
sync
"""


#: the kernel's command line: the image's root, no cloud-init (nothing to configure, and
#: its four stages are a minute under TCG), and systemd's kernel-command-line service
#: mounting the writable share and running the script in it, then powering off
CMDLINE = ("root=LABEL=root ro console=ttyS0,115200 net.ifnames=0 quiet cloud-init=disabled "
           "systemd.run_success_action=poweroff systemd.run_failure_action=poweroff "
           "systemd.run=\"/bin/sh -c 'mkdir -p /run/v2out && mount -t 9p -o "
           "trans=virtio,version=9p2000.L out /run/v2out && exec /bin/sh /run/v2out/run.sh'\"")


def extract_boot(disk: Path, work: Path) -> None:
    """The image's kernel and initrd, from its EFI system partition (from the first MiB,
    see osimage.partition_script), to boot them directly with the command line above.
    (UEFI boot itself is test_realos's.)"""
    esp = work / "esp.raw"
    subprocess.run(["qemu-img", "dd", "-f", "qcow2", "-O", "raw", "bs=1M", "skip=1",
                    f"count={ESP_MIB}", f"if={disk}", f"of={esp}"], check=True)
    for f in ("vmlinuz", "initrd.img"):
        subprocess.run(["mcopy", "-n", "-i", str(esp), f"::/{f}", str(work / f)], check=True)
    esp.unlink()


def qemu_argv(work: Path, dirs: dict[str, Path], accel: str) -> list[str]:
    argv = ["qemu-system-x86_64", "-name", "consolidator-v2tests", "-nodefaults",
            "-no-user-config", "-machine", f"q35,accel={accel}", "-cpu", "max",
            "-smp", "1", "-m", "1536", "-display", "none",
            "-kernel", str(work / "vmlinuz"), "-initrd", str(work / "initrd.img"),
            "-append", CMDLINE,
            "-drive", f"if=virtio,format=qcow2,file={work / 'overlay.qcow2'}",
            "-nic", "none", "-runas", "nobody",    # root only to open its files
            "-serial", f"file:{work / 'console.log'}",
            "-virtfs", f"local,path={work / 'out'},mount_tag=out,security_model=none"]
    for tag, p in dirs.items():
        argv += ["-virtfs", f"local,path={p},mount_tag={tag},security_model=none,readonly=on"]
    return argv


def run(work: Path, tests: list[str] | None = None, timeout: float = 900) -> Outcome:
    """Boot the guest in ``work`` (an empty directory), run the tests, return what came."""
    t0 = time.monotonic()
    disk = build_debian(CACHE, "bookworm", "uefi").disk
    site = site_packages()
    dirs = shares(site)
    (work / "out").mkdir()
    os.chown(work / "out", NOBODY, -1)      # QEMU writes the results there as nobody
    extract_boot(disk, work)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(disk),
                    str(work / "overlay.qcow2")], check=True)
    (work / "out" / "run.sh").write_text(script(tests or DEFAULT_TESTS, dirs, site))
    accel = choose_accel(probe_kvm())
    print(f"v2guest: {accel.reason}", file=sys.stderr)
    proc = subprocess.Popen(qemu_argv(work, dirs, accel.name), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        out += f"\nv2guest: QEMU killed after {timeout:.0f}s"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    res = work / "out"

    def text(name: str) -> str:
        p = res / name
        return p.read_text(errors="replace") if p.exists() else ""

    rc = text("rc").strip()
    console = text("../console.log")
    return Outcome(int(rc) if rc.lstrip("-").isdigit() else None,
                   text("pytest.log") or text("script.log") or out,
                   text("mounts"), junit_results(res / "junit.xml"),
                   time.monotonic() - t0, console[-6000:])


def junit_results(path: Path) -> dict[str, str]:
    """Each test case in pytest's JUnit XML and how it ended."""
    if not path.exists():
        return {}
    out = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        ends = [c.tag for c in case if c.tag in ("failure", "error", "skipped")]
        out[f"{case.get('classname')}::{case.get('name')}"] = ends[0] if ends else "passed"
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, help="keep the run's files here")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("tests", nargs="*")
    a = ap.parse_args()
    if a.workdir:
        a.workdir.mkdir(parents=True)
        work, tmp = a.workdir, None
    else:
        tmp = tempfile.TemporaryDirectory(prefix="consolidator-v2guest-")
        work = Path(tmp.name)
    try:
        o = run(work, a.tests or None, a.timeout)
    finally:
        if tmp is not None:
            tmp.cleanup()
    print(o.output)
    print(f"guest cgroup mounts:\n{o.cgroup_mounts}")
    print(f"v2guest: pytest exit {o.rc} in the guest; {len(o.results)} tests; "
          f"{o.seconds:.0f}s in all")
    if o.rc is None:
        print(o.console, file=sys.stderr)
    return 1 if o.rc is None else o.rc


if __name__ == "__main__":
    sys.exit(main())
