"""The supervisor's API messages: checked where they arrive (daemon/server.py)."""

from __future__ import annotations

import json

import pytest

from consolidator.daemon.server import ARGS, check_message
from consolidator.errors import UsageError


def line(obj) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def test_null_for_an_optional_argument_is_the_argument_not_given():
    # what `consolidator snapshot create web` (no --tag) sends
    rid, op, args = check_message(line({"id": 3, "op": "snapshot-create",
                                        "args": {"names": ["web"], "memory": False,
                                                 "tag": None}}))
    assert (rid, op, args) == (3, "snapshot-create", {"names": ["web"], "memory": False})


@pytest.mark.parametrize("msg,error", [
    ({"id": 1, "op": "snapshot-create", "args": {"names": None}}, "names has the wrong type"),
    ({"id": 1, "op": "snapshot-create", "args": {}}, "missing names"),
    ({"id": 1, "op": "snapshot-create", "args": {"names": [], "tag": 5}},
     "tag has the wrong type"),
    ({"id": 1, "op": "snapshot-create", "args": {"names": [], "nope": None}},
     "unknown argument 'nope'"),
    ({"id": 1, "op": "snapshot-create", "args": {"names": [], "memory": 1}},
     "memory has the wrong type"),
    ({"id": True, "op": "ping"}, "id is not an integer"),
    ({"id": 1, "op": "nope"}, "unknown operation 'nope'"),
    ({"id": 1, "op": "ping", "args": []}, "args is not an object"),
])
def test_a_bad_message_says_what_is_wrong(msg, error):
    with pytest.raises(UsageError, match=error):
        check_message(line(msg))


def test_every_required_argument_stays_required_when_null():
    for op, spec in ARGS.items():
        for k, (_, required) in spec.items():
            if required:
                with pytest.raises(UsageError):
                    check_message(line({"id": 1, "op": op, "args": {k: None}}))
