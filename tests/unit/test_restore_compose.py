"""The inventory a restore applies, composed from the one in force and a backup's (pure)."""

from __future__ import annotations

import pytest
import yaml

from consolidator.backup.compose import compose, free_address
from consolidator.errors import UsageError

BACKUP = """
instance: old
images:
  deb: {disk: images/deb.qcow2}
networks:
  lan: {subnet: 10.0.0.0/24, gateway: 10.0.0.1, dhcp: false}
  dyn: {subnet: 10.1.0.0/24}
guests:
  web:
    image: deb
    cdrom: isos/x.iso
    cloud_init: {user_data: web.cfg}
    nics:
      - {network: lan, ip: 10.0.0.10, mac: "52:54:00:00:00:10"}
      - {network: dyn, ip: 10.1.0.10}
  db: {}
"""
CURRENT = """
instance: new
networks:
  lan: {subnet: 10.0.0.0/24, gateway: 10.0.0.1, dhcp: false}
guests:
  app:
    nics: [{network: lan, ip: 10.0.0.2}]
"""


def test_a_fresh_host_gets_the_backups_inventory_with_that_guest_only():
    text, notes = compose(None, BACKUP, "web", "web", backup_dir="/srv/inv",
                          fresh_identity=False)
    doc = yaml.safe_load(text)
    assert doc["instance"] == "old" and list(doc["guests"]) == ["web"]
    web = doc["guests"]["web"]
    assert web["nics"][0]["mac"] == "52:54:00:00:00:10"        # the same identity
    assert web["cdrom"] == "/srv/inv/isos/x.iso"
    assert web["cloud_init"]["user_data"] == "/srv/inv/web.cfg"
    assert doc["images"]["deb"]["disk"] == "/srv/inv/images/deb.qcow2"


def test_as_a_new_guest_in_the_fleet_in_force():
    text, notes = compose(CURRENT, BACKUP, "web", "web2", backup_dir="/srv/inv",
                          fresh_identity=True)
    doc = yaml.safe_load(text)
    assert doc["instance"] == "new" and set(doc["guests"]) == {"app", "web2"}
    nics = doc["guests"]["web2"]["nics"]
    assert all("mac" not in n for n in nics)                    # derived from the new name
    assert nics[0]["ip"] == "10.0.0.3"       # static network: first free (.1 gw, .2 app)
    assert "ip" not in nics[1]               # a DHCP network allocates one
    assert doc["networks"]["lan"]["subnet"] == "10.0.0.0/24"    # the fleet's, kept
    assert doc["networks"]["dyn"]["subnet"] == "10.1.0.0/24"    # from the backup
    assert doc["images"]["deb"]["disk"] == "/srv/inv/images/deb.qcow2"
    assert any("network dyn comes from the backup" in n for n in notes)


def test_a_name_in_force_is_refused_and_an_unknown_guest_too():
    with pytest.raises(UsageError, match="already has a guest 'app'"):
        compose(CURRENT, BACKUP.replace("web:", "app:"), "app", "app", backup_dir=None,
                fresh_identity=False)
    with pytest.raises(UsageError, match="no guest 'nosuch'"):
        compose(CURRENT, BACKUP, "nosuch", "nosuch", backup_dir=None, fresh_identity=False)


def test_free_address():
    assert free_address("10.0.0.0/30", {"10.0.0.1"}) == "10.0.0.2"
    assert free_address("10.0.0.0/30", {"10.0.0.1", "10.0.0.2"}) is None
    assert free_address("not a net", set()) is None
