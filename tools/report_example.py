#!/usr/bin/env python3
"""Make the README's example report from a real, loaded run of the shipped inventory.

Runs inventory.yaml (under a unique instance, its fabric in its own netns), drives load
through the guest agent in phases (CPU on web and app, then a memory allocation in db,
then quiet), and at the end prints `consolidator report` as a table, writes the HTML
report, and screenshots it with headless Chromium into docs/report-screenshot.png.
Everything it made is destroyed afterwards.

Run as root: python tools/report_example.py [--seconds 180] [--shot docs/report-screenshot.png]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools" / "bench"))
from rebalance import Fleet  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=180.0, help="length of the loaded run")
    ap.add_argument("--shot", type=Path, default=ROOT / "docs" / "report-screenshot.png")
    args = ap.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("needs chromium (apt-get install chromium)")
    text = (ROOT / "inventory.yaml").read_text()
    text = text.replace("instance: cns ", "instance: {inst} ", 1)
    text = text.replace("fabric_netns: null ", "fabric_netns: {inst}-fab ", 1)
    text = text.replace("  metrics:\n    enabled: true", "  metrics:\n    enabled: false", 1)
    f = Fleet(text)
    try:
        f.cli("apply")
        third = args.seconds / 3
        f.cli("agent", "web", "cpu", "60")
        f.cli("agent", "app", "cpu", "25")
        time.sleep(third)
        f.cli("agent", "db", "mem", "160")
        f.cli("agent", "web", "cpu", "20")
        time.sleep(third)
        f.cli("agent", "db", "mem", "0")
        f.cli("agent", "app", "cpu", "0")
        time.sleep(third)
        print(f.cli("report", "--window", f"{int(args.seconds) + 30}s"))
        with tempfile.TemporaryDirectory() as tmp:
            html = Path(tmp) / "report.html"
            f.cli("report", "--format", "html", "-o", str(html),
                  "--window", f"{int(args.seconds) + 30}s")
            subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                            "--no-first-run", "--hide-scrollbars",
                            f"--user-data-dir={Path(tmp) / 'profile'}",
                            f"--screenshot={args.shot}", "--window-size=1400,2200",
                            html.as_uri()], check=True, capture_output=True, timeout=120)
        print(f"screenshot: {args.shot}", file=sys.stderr)
    finally:
        f.destroy()


if __name__ == "__main__":
    main()
