"""Guest uids: the range, the claims, when a uid may go to another guest."""

from __future__ import annotations

import os
import time

import pytest

from consolidator.errors import HostError
from consolidator.state import StateDir
from consolidator.vm.identity import FRESH, Owner, Registry, candidates

FIRST, COUNT = 0x70100000, 64


def test_candidates_cover_the_range_once_from_a_stable_start():
    a = list(candidates(FIRST, COUNT, "s\0web"))
    assert sorted(a) == list(range(FIRST, FIRST + COUNT))
    assert a == list(candidates(FIRST, COUNT, "s\0web"))
    assert a[0] != list(candidates(FIRST, COUNT, "s\0db"))[0] or COUNT == 1


def owner(tmp_path, guest: str, uid: int | None = None) -> Owner:
    """A guest of the state dir under tmp_path; with ``uid``, its record names it."""
    state = StateDir(tmp_path / "state")
    if uid is not None:
        state.write_guest_record(guest, {"name": guest, "facts": {
            "identity": {"uid": uid, "gid": uid}}})
    return Owner(str(state.root), guest)


def age(reg: Registry, uid: int, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(reg.root / str(uid), (t, t))


def test_each_guest_gets_its_own_uid_and_keeps_it(tmp_path):
    reg = Registry(tmp_path / "ids")
    web, db = owner(tmp_path, "web"), owner(tmp_path, "db")
    a = reg.claim(web, FIRST, COUNT)
    b = reg.claim(db, FIRST, COUNT)
    assert a != b and FIRST <= a < FIRST + COUNT and FIRST <= b < FIRST + COUNT
    assert reg.claim(web, FIRST, COUNT) == a
    assert oct((reg.root).stat().st_mode & 0o777) == "0o700"


def test_a_uid_held_by_a_guest_whose_record_names_it_is_never_taken(tmp_path):
    reg = Registry(tmp_path / "ids")
    web = owner(tmp_path, "web")
    a = reg.claim(web, FIRST, 1)
    owner(tmp_path, "web", a)                  # its record names the uid
    age(reg, a, FRESH * 2)
    with pytest.raises(HostError, match="no free uid"):
        reg.claim(owner(tmp_path, "db"), FIRST, 1)


def test_a_fresh_claim_is_held_before_the_record_names_it(tmp_path):
    reg = Registry(tmp_path / "ids")
    reg.claim(owner(tmp_path, "web"), FIRST, 1)
    with pytest.raises(HostError):
        reg.claim(owner(tmp_path, "db"), FIRST, 1)


def test_a_uid_goes_to_another_guest_only_after_its_guest_is_gone(tmp_path):
    reg = Registry(tmp_path / "ids")
    web = owner(tmp_path, "web")
    a = reg.claim(web, FIRST, 1)
    owner(tmp_path, "web", a)
    age(reg, a, FRESH * 2)
    StateDir(web.state).remove_guest_files("web", purge=True)     # the guest is gone
    assert reg.claim(owner(tmp_path, "db"), FIRST, 1) == a


def test_release_frees_the_guests_uids_and_no_one_elses(tmp_path):
    reg = Registry(tmp_path / "ids")
    web, db = owner(tmp_path, "web"), owner(tmp_path, "db")
    a, b = reg.claim(web, FIRST, COUNT), reg.claim(db, FIRST, COUNT)
    assert reg.release(web) == [a]
    assert reg.holder(a) is None and reg.holder(b) == db
    other = Owner(str(tmp_path / "other"), "web")
    c = reg.claim(other, FIRST, COUNT)
    assert sorted(reg.release_state(web.state)) == [b]
    assert reg.holder(c) == other


def test_the_recorded_uid_is_asked_for_first(tmp_path):
    reg = Registry(tmp_path / "ids")
    assert reg.claim(owner(tmp_path, "web"), FIRST, COUNT, want=FIRST + 7) == FIRST + 7
    # outside the range (the range changed): a uid from the range instead
    got = reg.claim(owner(tmp_path, "db"), FIRST, COUNT, want=FIRST - 1)
    assert FIRST <= got < FIRST + COUNT


def test_a_uid_the_host_names_or_uses_is_never_handed_out(tmp_path):
    reg = Registry(tmp_path / "ids")
    with pytest.raises(HostError):
        reg.claim(owner(tmp_path, "web"), 0, 1)                  # root
    with pytest.raises(HostError):
        reg.claim(owner(tmp_path, "web"), 65534, 1)              # nobody


def test_an_unreadable_claim_is_stale(tmp_path):
    reg = Registry(tmp_path / "ids")
    reg.root.mkdir(mode=0o700)
    (reg.root / str(FIRST)).write_text("{not json")
    age(reg, FIRST, FRESH * 2)
    assert reg.claim(owner(tmp_path, "web"), FIRST, 1) == FIRST
