"""The capacity report and the metrics endpoint against a real, loaded fleet."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from consolidator.hostfacts import HostFacts

from .env import CliFleet, cli_fleet, shipped_inventory

# the tests on the loaded fleet compare usage figures: quiet; the others measure nothing
pytestmark = pytest.mark.usefixtures("need_root", "tiny_image")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    port = free_port()
    tmp = tmp_path_factory.mktemp("report")
    with cli_fleet(tmp) as f:
        f.write(shipped_inventory(f.instance, metrics_port=port))
        f.cli("apply")
        f.cli("agent", "web", "cpu", "50")
        f.cli("agent", "app", "cpu", "20")
        f.cli("agent", "db", "mem", "64")
        time.sleep(5)
        t0 = time.time()
        cg0 = {g: cpuacct(f, g) for g in ("web", "app", "db")}
        time.sleep(40)
        cg1 = {g: cpuacct(f, g) for g in ("web", "app", "db")}
        t1 = time.time()
        st = json.loads(f.cli("status", "--json", "--explain").stdout)
        rep = json.loads(f.cli("report", "--format", "json", "--window",
                               f"{int(time.time() - t0)}s").stdout)
        yield {"f": f, "port": port, "rates": {g: (cg1[g] - cg0[g]) / 1e9 / (t1 - t0)
                                               for g in cg0},
               "status": st, "report": rep}


def cpuacct(f: CliFleet, guest: str) -> int:
    return int(Path(f"/sys/fs/cgroup/cpuacct/{f.instance}/guests/{guest}/cpuacct.usage")
               .read_text())


@pytest.mark.quiet
def test_report_usage_agrees_with_cgroup_and_qmp_within_5_percent(loaded):
    rep, rates, st = loaded["report"], loaded["rates"], loaded["status"]
    guests = {g["name"]: g for g in rep["guests"]}
    assert rep["window"]["source"] == "raw"
    for name, rate in rates.items():
        mean = guests[name]["cpu"]["mean"]
        if rate >= 0.1:
            assert abs(mean - rate) <= 0.05 * rate, (name, mean, rate)
        else:                              # near idle: 5 % of nothing is noise
            assert abs(mean - rate) <= 0.01, (name, mean, rate)
    for g in st["guests"]:
        b = guests[g["name"]]["balloon"]
        assert abs(b["mean"] - g["balloon_bytes"]) <= 0.05 * g["balloon_bytes"]
        ws_qmp = g["explain"]["memory"]["ws"]
        ws_rep = guests[g["name"]]["working_set"]["p50"]
        assert abs(ws_rep - ws_qmp) <= 0.05 * ws_qmp, (g["name"], ws_qmp, ws_rep)


@pytest.mark.quiet
def test_report_sections_and_fits(loaded):
    rep = loaded["report"]
    assert rep["format"] == 1 and rep["host"]["committed"]["vcpus"] == 3
    assert rep["fits"] and all(f["by_guarantees"]["binding"] in ("FAILMEM", "FAILCPU",
                                                                 "FAILVCPU")
                               for f in rep["fits"])
    assert all(f["by_observed"] is not None for f in rep["fits"])
    f: CliFleet = loaded["f"]
    shaped = json.loads(f.cli("report", "--format", "json", "--shape",
                              "vcpus=1,memory=512MiB,reserve=0.25", "--tiered").stdout)
    (fit,) = shaped["fits"]
    assert fit["shape"] == "vcpus=1,memory=512MiB,reserve=0.25"
    assert fit["tiers"][0]["count"] == fit["by_guarantees"]["count"]
    table = f.cli("report").stdout
    assert "how many more fit" in table and "FAIL" in table


@pytest.mark.quiet
def test_html_report_in_headless_chromium(loaded, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (the test setup installs it)")
    f: CliFleet = loaded["f"]
    html = tmp_path / "report.html"
    f.cli("report", "--format", "html", "-o", str(html))
    text = html.read_text()
    import re
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", text)
    assert "url(http" not in text and "@import" not in text
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
             "--enable-logging=stderr", "--v=0"]
    dom = subprocess.run(flags + ["--dump-dom", html.as_uri()], capture_output=True,
                         text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    for chart in ("chart-host-cpu", "chart-host-mem", "chart-guest-mem", "chart-guest-cpu"):
        assert f'id="{chart}"' in dom.stdout
    assert dom.stdout.count("<svg") == 4 and 'id="fits"' in dom.stdout
    assert "Failed to load resource" not in dom.stderr and "net::ERR_" not in dom.stderr
    png = tmp_path / "shot.png"
    shot = subprocess.run(flags + [f"--screenshot={png}", "--window-size=1400,2400",
                                   "--hide-scrollbars", html.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert png.exists() and png.stat().st_size > 20_000, shot.stderr[-2000:]
    import matplotlib.image as mpimg
    img = mpimg.imread(str(png))
    assert img.std() > 0.05                       # not a blank page: charts and tables


@pytest.mark.quiet
def test_prometheus_endpoint_serves_every_guest(loaded):
    from prometheus_client.parser import text_string_to_metric_families
    body = urllib.request.urlopen(f"http://127.0.0.1:{loaded['port']}/metrics",
                                  timeout=10).read().decode()
    fams = {f.name: f for f in text_string_to_metric_families(body)}
    for name in ("consolidator_guest_up", "consolidator_guest_balloon_bytes",
                 "consolidator_guest_memory_working_set_bytes", "consolidator_guest_cpu_cores",
                 "consolidator_guest_memory_max_bytes", "consolidator_host_budget_bytes"):
        assert name in fams, name
    for name in ("consolidator_guest_up", "consolidator_guest_balloon_bytes",
                 "consolidator_guest_memory_working_set_bytes"):
        guests = {s.labels["guest"] for s in fams[name].samples}
        assert guests == {"web", "app", "db"}, (name, guests)
    assert all(s.labels["fleet"] == loaded["f"].instance
               for s in fams["consolidator_guest_up"].samples)


def test_report_right_after_start_says_how_little_history(tmp_path):
    with cli_fleet(tmp_path) as f:
        f.cli("apply")
        rep = json.loads(f.cli("report", "--format", "json").stdout)
        assert rep["window"]["note"]
        assert rep["host"]["committed"]["memory_max"] == 3 * (256 << 20)
        # the shipped fleet reserves 3 x 0.25 cores of (CPUs - 0.5); vCPUs may be 4 per
        # usable core: on this host the next guest of the same shape is bound by one of these
        usable = HostFacts.probe().ncpus - 0.5
        by_cpu, by_vcpu = math.floor((usable - 0.75) / 0.25), math.floor(4 * usable - 3)
        for x in rep["fits"]:
            fit = x["by_guarantees"]
            assert fit["limits"]["cpu_reserve"] == by_cpu
            assert fit["limits"]["vcpu_overcommit"] == by_vcpu
            assert fit["count"] == min(fit["limits"].values())


HELD = """
instance: {inst}
host: {{fabric_netns: {inst}-fab, metrics: {{enabled: true, listen: "127.0.0.1:PORT"}}}}
networks:
  n: {{subnet: 10.95.0.0/24}}
"""


def test_a_metrics_port_held_by_another_process_is_shown_and_retried(tmp_path):
    """It used to be logged once and never tried again: another local user could serve
    fake consolidator_* figures there for good."""
    port = free_port()
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    squatter.bind(("127.0.0.1", port))
    squatter.listen()
    try:
        with cli_fleet(tmp_path, HELD.replace("PORT", str(port))) as f:
            f.cli("apply")
            m = f.status()["metrics"]
            assert m["listen"] == f"127.0.0.1:{port}" and not m["serving"]
            assert "Address already in use" in m["error"]
            assert "metrics: cannot listen" in f.cli("status").stdout
            doctor = f.cli("doctor", "--json", inventory=f.inventory)
            fact = next(x for x in json.loads(doctor.stdout)["facts"]
                        if x["name"] == "metrics port")
            assert not fact["ok"] and f"(pid {os.getpid()})" in fact["value"]
            squatter.close()
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and not f.status()["metrics"]["serving"]:
                time.sleep(0.5)
            assert f.status()["metrics"] == {"listen": f"127.0.0.1:{port}", "serving": True,
                                            "error": None}
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10)
            assert f'consolidator_host_budget_bytes{{fleet="{f.instance}"}}' in \
                body.read().decode()
    finally:
        squatter.close()
