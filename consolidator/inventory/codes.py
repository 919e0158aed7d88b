"""Every rule of the inventory, by its stable code.

A code names one rule and never changes meaning; new rules get new codes. Each problem
shows its code last (``... [A003]``), so a script or a search can tell rules apart
without reading messages. ``tests/data/bad/`` holds at least one inventory per code
(the unit tests check that), and the README's inventory reference lists them.

Letters: **Y** the file and its YAML, **S** structure (the schema), **N** names,
**H** host settings, **I** images, **A** networks and addresses, **G** one guest's resources, **C** capacity
of the host as a whole.
"""

from __future__ import annotations

CODES: dict[str, str] = {
    # the file and its YAML
    "Y001": "YAML syntax error",
    "Y002": "duplicate key",
    "Y003": "the document is not a mapping",
    "Y004": "the file cannot be read: missing, unreadable, not a regular file, over 512 KiB",
    "Y005": "a key is not a string",
    "Y006": "not UTF-8 text, or a character YAML does not allow (NUL, say)",
    "Y008": "nested deeper than 64 levels",
    "Y009": "a tag other than YAML's plain types (!!python/object, say)",
    # structure
    "S001": "unknown key",
    "S002": "required field missing",
    "S003": "wrong type or unparsable value",
    # names
    "N001": "instance is not 1-8 of a-z0-9 starting with a letter",
    "N002": "image, network or guest name is not a DNS label",
    "N003": "host.fabric_netns is not a usable netns name",
    "N004": "label key is not 1-63 of letters, digits, '.', '_', '/', '-'",
    "N005": "host.cgroup_parent is not a relative path of cgroup names",
    # host settings
    "H001": "host.metrics.listen off loopback without host.metrics.public: true",
    "H002": "host.api_group names no group on this host",
    "H003": "host.guest_ids runs past the last uid (4294967294)",
    "H004": "host.runas names no user on this host",
    "H005": "host.backup.dir is not an absolute path",
    # images
    "I001": "an image needs builtin, kernel or disk",
    "I002": "a builtin image takes no initrd",
    "I003": "initrd without a kernel",
    "I004": "cmdline without a kernel or builtin",
    "I005": "format without a disk",
    "I006": "the disk's format cannot be told from its name",
    "I007": "no such file",
    "I008": "not a regular, readable file",
    "I009": "the guest names an undeclared image",
    "I010": "cmdline sets a parameter the supervisor sets (consolidator.*; console= on builtin)",
    "I011": "a kernel, initrd or disk outside the image roots (links followed)",
    "I012": "a disk whose backing chain leaves the image roots, or cannot be read",
    "I013": "a disk whose format is not the declared one",
    "I014": "firmware on an image or guest whose kernel QEMU loads",
    "I015": "an OS id libosinfo does not know (did you mean ...)",
    "I016": "UEFI firmware (host.uefi) not installed",
    "I017": "from names a guest the inventory lacks, or one whose image has no disk",
    "I018": "from with a disk, kernel, builtin or cdrom: an image of a guest boots as it did",
    "I019": "from names a snapshot or backup the guest does not have",
    # networks and addresses
    "A001": "subnet smaller than /30",
    "A002": "an address's prefix differs from its subnet's",
    "A003": "an address outside its subnet",
    "A004": "the subnet's network address",
    "A005": "the subnet's broadcast address",
    "A006": "nat without a gateway",
    "A007": "subnets of two networks with gateways overlap",
    "A008": "a NIC names an undeclared network",
    "A009": "a guest address is its network's gateway",
    "A010": "an address used twice on one network",
    "A011": "a multicast MAC",
    "A012": "the all-zero MAC",
    "A013": "a MAC used twice",
    "A014": "forward_to names an undeclared network",
    "A015": "forward_to a network itself, or between networks without both gateways",
    "A016": "a guest address is an isolated network's DHCP/DNS service address (its last)",
    # one guest's resources
    "G001": "memory.max under 32 MiB",
    "G002": "memory.max not a whole number of MiB",
    "G003": "memory.min above memory.max",
    "G004": "more vCPUs than the host has CPUs",
    "G005": "cpu.reserve above cpu.limit",
    "G006": "cpu.reserve above vcpus",
    "G007": "cpu.limit above vcpus",
    "G008": "cpu.pin names CPUs the host does not have",
    "G009": "cpu.reserve above the pinned CPUs",
    "G010": "an IDE disk on q35, which has no IDE controller",
    "G011": "a boot order naming a device the guest lacks, twice, or on a kernel boot",
    "G012": "data disks: a name twice, or a size not a whole number of MiB",
    "G013": "ready: a tcp port out of range, or a serial pattern that is no regex",
    "G014": "cloud_init: user-data unreadable or not valid YAML, or a kernel-booted image",
    "G015": "display: vga where QEMU cannot show a screen (no VGA BIOS)",
    "G016": "I/O limits: bps with read_bps/write_bps, or a burst below its limit or "
            "without one",
    # the host as a whole
    "C001": "host.reserve.cpus leaves no CPU for guests",
    "C002": "host.reserve.memory is all of the host's RAM",
    "C003": "host.memory above RAM minus the reserve",
    "C004": "cpu reserves add up to more than the usable cores",
    "C005": "memory minimums add up to more than the budget",
    "C006": "vCPUs beyond the CPU overcommit ratio",
    "C007": "memory maximums beyond the memory overcommit ratio",
}
