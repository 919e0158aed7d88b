from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from consolidator.inventory.derive import derive_mac
from consolidator.net import names

instances = st.from_regex(r"[a-z][a-z0-9]{0,7}", fullmatch=True)
labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", fullmatch=True)


@given(instances, labels, st.integers(0, 15))
def test_interface_names_fit_15_bytes_and_keep_the_prefix(inst, guest, i):
    for n in (names.bridge(inst, guest), names.guest_port(inst, guest, i)):
        assert len(n.encode()) <= 15
        assert names.link_is_ours(inst, n)


@given(instances, instances, labels, st.integers(0, 15))
def test_no_instance_owns_another_instances_names(a, b, name, i):
    """gc of instance b never takes a's objects: instance names hold no '-' or '.', so a
    prefix never matches another instance's, even when one name starts the other."""
    if a == b:
        return
    assert names.bridge(a, name) != names.bridge(b, name)
    for ifname in (names.bridge(a, name), names.guest_port(a, name, i)):
        assert not names.link_is_ours(b, ifname)
    assert not names.netns_is_ours(b, names.guest_netns(a, name))
    assert not names.nft_table_is_ours(b, names.nft_guard_table(a))


def test_a_prefix_instance_does_not_own_the_longer_ones():
    assert not names.link_is_ours("cn", names.bridge("cns", "front"))
    assert not names.link_is_ours("cns", names.bridge("cn", "s-front"))
    assert not names.netns_is_ours("cn", names.guest_netns("cns", "web"))


def test_prefix_match_is_exact():
    assert names.link_is_ours("cns", "cns-front")
    assert not names.link_is_ours("cns", "cns2-front")     # another instance
    assert not names.link_is_ours("cns", "cnsfront")
    assert names.nft_table_is_ours("cns", "cns_guard")
    assert not names.nft_table_is_ours("cns", "cns2_guard")


def test_long_names_are_hashed_deterministically():
    a = names.guest_port("instance", "a-very-long-guest-name", 0)
    assert a == names.guest_port("instance", "a-very-long-guest-name", 0)
    assert a != names.guest_port("instance", "a-very-long-guest-name", 1)
    assert len(a) == 15 and a.startswith("instance.a-")


@given(instances, labels, st.integers(0, 7))
def test_mac_is_unicast_local_and_stable(inst, guest, i):
    mac = derive_mac(inst, guest, i)
    first = int(mac[:2], 16)
    assert first & 1 == 0 and first & 2 == 2
    assert mac == derive_mac(inst, guest, i)
