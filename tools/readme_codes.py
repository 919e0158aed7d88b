#!/usr/bin/env python3
"""Rewrite the README's table of inventory rules from consolidator/inventory/codes.py.

tests/unit/test_inventory_bad.py fails when the two disagree; run this after adding a rule:
    python tools/readme_codes.py
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from consolidator.inventory.codes import CODES  # noqa: E402

GROUPS = {"Y": "file and YAML", "S": "structure", "N": "names", "H": "host settings",
          "I": "images",
          "A": "networks and addresses", "G": "one guest", "C": "the host as a whole"}


def table() -> str:
    rows = ["| rules | codes |", "|---|---|"]
    for letter, title in GROUPS.items():
        items = [f"`{c}` {d}" for c, d in CODES.items() if c[0] == letter]
        rows.append(f"| {letter}: {title} | " + "; ".join(items) + " |")
    return "\n".join(rows)


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    start = text.index("| rules | codes |")
    end = text.index("\n\n", start)
    readme.write_text(text[:start] + table() + text[end:])


if __name__ == "__main__":
    main()
