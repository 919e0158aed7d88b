"""Unit tests run the same on any host: the host's facts are injected, never read.

Every call of ``HostFacts.probe()`` under tests/unit gets the same made-up host, 2 CPUs
and 8 GiB, whatever machine runs the suite (a 1-CPU runner included).
"""

from __future__ import annotations

import pytest

from consolidator.hostfacts import HostFacts

FACTS = HostFacts(cpus=(0, 1), memory_total=8 << 30)


@pytest.fixture(autouse=True)
def fixed_host(monkeypatch: pytest.MonkeyPatch) -> HostFacts:
    monkeypatch.setattr(HostFacts, "probe", classmethod(lambda cls: FACTS))
    return FACTS
