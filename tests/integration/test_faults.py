"""Faults nobody names in the happy path: a QEMU that stops answering (SIGSTOP), and the
guests beside it that must not notice."""

from __future__ import annotations

import os
import signal
import time

import pytest

from consolidator.daemon import protocol

from .env import CliFleet, cli_fleet, wait_for

# beside the real-OS boots: nothing here measures CPU, and its time bounds (seconds to
# notice, a second for the API) hold on a loaded host
pytestmark = [pytest.mark.usefixtures("need_root", "tiny_image"), pytest.mark.long]

TWO = """
instance: {inst}
host: {{fabric_netns: {inst}-fab, rebalance: {{interval: 1s}}, metrics: {{enabled: false}}}}
networks:
  lan: {{subnet: 10.87.0.0/24, gateway: 10.87.0.1, dhcp: true}}
guests:
  a: {{memory: {{max: 192MiB, min: 96MiB}}}}
  b: {{memory: {{max: 192MiB, min: 96MiB}}, nics: [{{network: lan}}]}}
"""


def api_status(f: CliFleet, explain: bool = False) -> tuple[dict, float]:
    """The status straight from the supervisor's socket, and how long it took."""
    t0 = time.monotonic()
    with protocol.connect(f.state, start=False) as c:
        doc = c.call("status", explain=explain)
    return doc, time.monotonic() - t0


def test_a_stopped_qemu_or_dnsmasq_is_unresponsive_left_alone_and_back_unrestarted(
        tmp_path):
    """One fleet, two faults in turn: a's QEMU stopped, then the network's dnsmasq."""
    with cli_fleet(tmp_path, TWO) as f:
        f.cli("apply")
        stopped_qemu(f)
        stopped_dnsmasq(f)


def stopped_qemu(f: CliFleet) -> None:
    pid = f.guests()["a"]["pid"]
    check_oom_order(f, guests=[pid, api_status(f)[0]["networks"][0]["dhcp"]["pid"]])
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        wait_for(lambda: {g["name"]: g for g in api_status(f)[0]["guests"]}["a"]
                 ["unresponsive_s"] is not None, 15, "a to show unresponsive")
        seen = time.monotonic() - t0
        assert seen < 8, seen                  # a quiet guest is asked every 3 s
        # the API answers at once, and the loop goes on deciding for the others
        doc, took = api_status(f, explain=True)
        assert took < 1.0, took
        ticks = doc["rebalancer"]["ticks"]
        time.sleep(4)
        doc, took = api_status(f, explain=True)
        assert took < 1.0, took
        assert doc["rebalancer"]["ticks"] - ticks >= 3, doc["rebalancer"]
        g = {x["name"]: x for x in doc["guests"]}
        assert "left alone" in g["a"]["explain"]["memory"]["reason"], g["a"]["explain"]
        assert "left alone" in g["a"]["explain"]["cpu"]["reason"]
        assert g["b"]["unresponsive_s"] is None and not g["b"]["errors"]
        assert g["b"]["explain"]["memory"]["ws"] is not None
        assert time.time() - g["b"]["explain"]["t"] < 3.5
        assert "unresponsive" in f.cli("status").stdout
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_for(lambda: f.guests()["a"]["unresponsive_s"] is None, 10, "a to answer again")
    a = f.guests()["a"]
    assert a["pid"] == pid and a["state"] == "running" and a["restarts"] == 0
    assert "crashed" not in f.events("a")
    log = (f.state / "supervisor" / "log.jsonl").read_text()
    assert '"observe.unresponsive"' in log and '"observe.responsive_again"' in log


def check_oom_order(f: CliFleet, guests: list[int]) -> None:
    """The OOM killer takes the host's other processes first, then a guest (QEMU and
    dnsmasq), the supervisor last; where the host withholds CAP_SYS_RESOURCE (as this
    container does) nothing can be lowered, and the supervisor says so."""
    from consolidator.linux import CAP_SYS_RESOURCE, has_capability

    def adj(pid: int) -> str:
        return open(f"/proc/{pid}/oom_score_adj").read().strip()
    sup = f.supervisor_pid()
    if has_capability(CAP_SYS_RESOURCE):
        assert adj(sup) == "-900" and [adj(p) for p in guests] == ["-500"] * len(guests)
    else:
        assert adj(sup) == "0" and all(adj(p) == "0" for p in guests)
        log = (f.state / "supervisor" / "log.jsonl").read_text()
        assert '"supervisor.oom_score_adj_refused"' in log
        doctor = f.cli("doctor", "--json", check=False).stdout
        assert "no CAP_SYS_RESOURCE" in doctor


def stopped_dnsmasq(f: CliFleet) -> None:
    dhcp = api_status(f)[0]["networks"][0]["dhcp"]
    assert dhcp["pid"] and dhcp["unresponsive"] is None, dhcp
    os.kill(dhcp["pid"], signal.SIGSTOP)
    try:
        got = wait_for(lambda: api_status(f)[0]["networks"][0]["dhcp"]["unresponsive"],
                       5, "the stopped dnsmasq to show")
        assert got == "stopped by a signal"
        doc, took = api_status(f)
        assert took < 1.0 and doc["guests"][1]["state"] == "running"
        assert "does not answer: stopped by a signal" in f.cli("status").stdout
    finally:
        os.kill(dhcp["pid"], signal.SIGCONT)
    after = api_status(f)[0]["networks"][0]["dhcp"]
    assert after["pid"] == dhcp["pid"] and after["restarts"] == 0
    assert after["unresponsive"] is None


FULL = """
instance: {inst}
host: {{fabric_netns: {inst}-fab, rebalance: {{interval: 1s}}, metrics: {{enabled: false}}}}
guests:
  a: {{memory: {{max: 128MiB}}@LABELS@}}
  b: {{memory: {{max: 128MiB}}}}
"""


def test_a_full_state_dir_fails_apply_clearly_and_the_history_resumes(tmp_path):
    """The state dir on a 48 MiB tmpfs, filled to the last byte: apply fails with the
    kernel's reason and changes nothing; every record still parses; the guests run on;
    the history says it is not recording, and records again once there is room."""
    import json
    import subprocess
    with cli_fleet(tmp_path, FULL.replace("@LABELS@", "")) as f:
        f.state.mkdir(mode=0o700)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m,mode=0700", "tmpfs",
                        str(f.state)], check=True)
        filler = f.state / "filler"
        try:
            f.cli("apply")
            pids = {n: g["pid"] for n, g in f.guests().items()}
            with open(filler, "wb") as out:         # to the last byte
                try:
                    while True:
                        out.write(b"\0" * (1 << 20))
                        out.flush()
                except OSError:
                    pass
            hist = wait_for(lambda: (h := api_status(f)[0]["history"] or {}).get("error")
                            and h, 10, "the history to say it cannot write")
            assert "full" in hist["error"] or "space" in hist["error"], hist
            assert hist["lost_samples"] >= 1 and not hist["recording"], hist
            assert "not recording" in f.cli("status").stdout
            f.write(FULL.replace("@LABELS@", ", labels: {{tier: web}}").format(
                inst=f.instance))
            res = f.cli("apply", check=False)
            assert res.returncode != 0
            assert "No space left on device" in res.stdout + res.stderr, res
            # nothing half-written: every record parses, and the guests run on
            for p in [f.state / "applied.json", *f.state.glob("guests/*/record.json")]:
                json.loads(p.read_text())
            assert {n: g["pid"] for n, g in f.guests().items()} == pids
            filler.unlink()
            wait_for(lambda: api_status(f)[0]["history"]["recording"], 10,
                     "the history to record again")
            f.cli("apply")                           # converges from there
            assert f.status()["guests"][0]["name"] == "a"
            log = (f.state / "supervisor" / "log.jsonl").read_text()
            assert '"history.recording_again"' in log
            assert {n: g["pid"] for n, g in f.guests().items()} == pids
        finally:
            try:
                filler.unlink(missing_ok=True)
                f.cli("destroy", "--yes", "--purge", check=False, timeout=120)
            finally:                             # whatever failed, the mount goes
                subprocess.run(["umount", "-l", str(f.state)], check=False)
