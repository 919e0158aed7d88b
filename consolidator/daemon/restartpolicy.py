"""What to do when a guest's QEMU exits. Pure: history and clock in, decision out.

- ``never``: stay down.
- ``on-failure``: restart after a crash (non-zero exit, a signal, a panic); a guest that
  powered off from inside is a clean exit and stays down.
- ``always``: restart after any exit the supervisor did not ask for.

Restarts back off exponentially (1 s, 2 s, 4 s ... capped at 60 s), counted over a
sliding window; after ``max_restarts`` in ``window`` the guest is ``failed`` and stays
down until the next ``apply`` or ``start``.
"""

from __future__ import annotations

from dataclasses import dataclass

BACKOFF_MIN = 1.0
BACKOFF_MAX = 60.0
MAX_RESTARTS = 5
WINDOW = 300.0


@dataclass(frozen=True)
class Decision:
    restart: bool
    delay: float        # seconds to wait before restarting
    failed: bool        # gave up: too many restarts in the window
    reason: str


def backoff(n: int, cap: float = BACKOFF_MAX) -> float:
    """Delay before the n-th restart in the window (n >= 1)."""
    return min(cap, BACKOFF_MIN * 2 ** max(0, n - 1))


def decide(policy: str, clean: bool, restarts: tuple[float, ...], now: float, *,
           max_restarts: int = MAX_RESTARTS, window: float = WINDOW,
           backoff_max: float = BACKOFF_MAX) -> Decision:
    """``restarts``: times of earlier automatic restarts of this guest."""
    if policy == "never":
        return Decision(False, 0.0, False, "restart: never")
    if clean and policy == "on-failure":
        return Decision(False, 0.0, False, "clean exit (powered off from inside)")
    recent = [t for t in restarts if now - t <= window]
    if len(recent) >= max_restarts:
        return Decision(False, 0.0, True, f"{len(recent)} restarts in the last "
                                          f"{window:g}s: giving up until apply or start")
    n = len(recent) + 1
    delay = backoff(n, backoff_max)
    why = "exited cleanly, restart: always" if clean else "crashed"
    return Decision(True, delay, False, f"{why}; restart {n}/{max_restarts} in {delay:g}s")
