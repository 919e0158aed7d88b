"""Disk I/O policy: the host's budget (``host.io``) divided by ``io.shares`` among the guests
doing I/O, as a ceiling on each guest's disks together. Pure.

Like VMware's Storage I/O Control, shares only matter under contention, and an idle guest
keeps nothing back:

- a guest under ``idle`` (bytes or operations a second) is not competing: it gets no
  ceiling at all, and the busy guests divide the whole budget;
- the busy guests divide the budget by weighted max-min fairness (water-filling). A guest
  that uses well under its ceiling wants only what it uses plus ``headroom``; what it
  leaves goes to the others by their shares. A guest at its ceiling (``throttled``) is
  assumed to want more, so the shares decide;
- the inventory's own limits are ceilings the share never exceeds (a guest whose every
  disk is limited wants no more than their sum);
- a ceiling changes only when it moves by more than ``min_change`` (hysteresis), so
  noise in the counters does not rewrite QEMU's throttle group each tick; when a guest
  starts or stops competing, every ceiling is set exactly.

Demand is the rate measured over the last interval, not smoothed: a guest that stops must
hand its part back within a tick or two, and a guest held at its ceiling shows as busy.
Bytes and operations are divided the same way, each by its own budget.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..units import human_rate

INF = float("inf")


@dataclass(frozen=True)
class IoInput:
    name: str
    shares: int
    bps: float | None              # bytes a second its disks moved (None: not measured)
    iops: float | None
    ceiling_bps: float | None = None    # the sum of its disks' own limits, if all have one
    ceiling_iops: float | None = None


@dataclass(frozen=True)
class IoDecision:
    name: str
    bps: int | None                # the guest's share ceiling (None: none)
    iops: int | None
    previous: tuple[int | None, int | None] | None
    reason: str

    @property
    def changed(self) -> bool:
        return self.previous is None or (self.bps, self.iops) != self.previous


@dataclass(frozen=True)
class IoParams:
    idle_bps: float = 256 << 10    # below this a guest is not competing for bytes
    idle_iops: float = 20.0
    throttled: float = 0.85        # using this much of its ceiling: it wants more
    headroom: float = 1.5          # a guest under its ceiling wants this much over its use
    min_change: float = 0.10


def _fill(budget: float, wants: dict[str, float], shares: dict[str, int],
          limits: dict[str, float]) -> dict[str, float]:
    """Weighted max-min fair division of ``budget``; a guest never gets over its want,
    unless every want is met, when what is left is shared by weight too, up to each
    guest's ``limits`` (its declared ceiling, or none)."""
    out: dict[str, float] = {}
    left, open_ = budget, dict(wants)
    while open_:
        total = sum(shares[n] for n in open_)
        fair = {n: left * shares[n] / total for n in open_}
        met = [n for n in open_ if open_[n] <= fair[n]]
        if not met:
            out.update(fair)
            return out
        for n in met:
            out[n] = open_.pop(n)
            left -= out[n]
    # every want met: the rest by weight, for growth, as far as the ceilings allow
    while left > 1e-6:
        room = [n for n in out if out[n] < limits[n]]
        if not room:
            break
        total = sum(shares[n] for n in room)
        given = 0.0
        for n in room:
            add = min(left * shares[n] / total, limits[n] - out[n])
            out[n] += add
            given += add
        left -= given
    return out


def _divide(guests: list[IoInput], budget: float | None, kind: str, idle: float,
            previous: dict[str, float | None], params: IoParams
            ) -> tuple[dict[str, float | None], dict[str, str]]:
    used = {g.name: getattr(g, kind) for g in guests}
    ceiling = {g.name: getattr(g, f"ceiling_{kind}") for g in guests}
    shown = human_rate if kind == "bps" else (lambda v: f"{v:.0f} IOPS")
    if not budget:
        return ({g.name: None for g in guests},
                {g.name: f"no host {kind} budget (host.io.{kind})" for g in guests})
    busy = [g for g in guests if (used[g.name] or 0.0) >= idle]
    caps: dict[str, float | None] = {g.name: None for g in guests}
    why = {g.name: f"idle ({shown(used[g.name] or 0.0)}): keeps nothing back"
           for g in guests}
    if not busy:
        return caps, why
    wants = {}
    for g in busy:
        u, prev = used[g.name] or 0.0, previous.get(g.name)
        held = prev is not None and u >= prev * params.throttled
        want = INF if held else u * params.headroom
        wants[g.name] = min(want, ceiling[g.name] or INF)
    share_of = {g.name: g.shares for g in busy}
    got = _fill(budget, wants, share_of, {g.name: ceiling[g.name] or INF for g in busy})
    total = sum(share_of.values())
    for g in busy:
        caps[g.name] = got[g.name]
        held = wants[g.name] == INF or wants[g.name] == ceiling[g.name]
        why[g.name] = (f"shares {g.shares} of {total} busy: {shown(got[g.name])} of the "
                       f"{shown(budget)} budget" + ("" if held else
                                                    f" (uses {shown(used[g.name] or 0.0)})"))
    return caps, why


def io_policy(guests: list[IoInput], *, budget_bps: float | None, budget_iops: float | None,
              previous: dict[str, tuple[int | None, int | None]] | None = None,
              params: IoParams = IoParams()) -> list[IoDecision]:
    prev = previous or {}
    bps, why_b = _divide(guests, budget_bps, "bps", params.idle_bps,
                         {n: p[0] for n, p in prev.items()}, params)
    iops, why_i = _divide(guests, budget_iops, "iops", params.idle_iops,
                          {n: p[1] for n, p in prev.items()}, params)
    # Hysteresis is for noise in the counters: when a guest starts or stops competing,
    # every part is set exactly (held back, the last part of a stopped guest's budget
    # would never reach the others).
    steady = [{g.name for g in guests if got[g.name] is not None} ==
              {g.name for g in guests if (prev.get(g.name) or (None, None))[i] is not None}
              for i, got in enumerate((bps, iops))]
    out = []
    for g in guests:
        old = prev.get(g.name)
        new = [None if v is None else max(1, int(v)) for v in (bps[g.name], iops[g.name])]
        reason = f"bytes: {why_b[g.name]}; operations: {why_i[g.name]}"
        if old is not None:
            for i in (0, 1):
                if steady[i] and old[i] is not None and new[i] is not None and \
                        new[i] != old[i] and abs(new[i] - old[i]) <= params.min_change * old[i]:
                    new[i] = old[i]
                    reason += f"; kept {('bytes', 'operations')[i]} within " \
                              f"{params.min_change:.0%}"
        out.append(IoDecision(g.name, new[0], new[1], old, reason))
    return out
