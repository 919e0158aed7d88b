from __future__ import annotations

import pytest
import yaml

from consolidator.inventory.yamlpos import Mark, load_yaml


def test_positions_of_keys_and_values():
    text = "guests:\n  web:\n    memory: {max: 256MiB}\n    nics:\n      - {network: a}\n"
    data, src, problems = load_yaml(text, "f.yaml")
    assert not problems
    assert data["guests"]["web"]["memory"]["max"] == "256MiB"
    assert src.keys[("guests", "web")] == Mark(2, 3)
    assert src.values[("guests", "web", "memory", "max")] == Mark(3, 19)
    assert src.values[("guests", "web", "nics", 0, "network")] == Mark(5, 19)
    # an absent path resolves to its nearest present parent
    assert src.value(("guests", "web", "memory", "min")) == Mark(3, 13)


def test_every_duplicate_is_reported_and_first_kept():
    text = "a: 1\nb: 2\na: 3\nb: 4\na: 5\n"
    data, _, problems = load_yaml(text, "f.yaml")
    assert data == {"a": 1, "b": 2}
    assert [(p.path, p.mark) for p in problems] == [
        (("a",), Mark(3, 1)), (("b",), Mark(4, 1)), (("a",), Mark(5, 1))]


def test_non_string_keys_are_reported():
    _, _, problems = load_yaml("guests:\n  no: {}\n  1: {}\n", "f.yaml")
    assert [p.path for p in problems] == [("guests", "false"), ("guests", "1")]


def test_merge_keys_still_work():
    text = "base: &b {vcpus: 1, restart: always}\nweb:\n  <<: *b\n  vcpus: 2\n"
    data, _, problems = load_yaml(text, "f.yaml")
    assert not problems
    assert data["web"] == {"vcpus": 2, "restart": "always"}


def test_syntax_error_raises_with_mark():
    with pytest.raises(yaml.MarkedYAMLError) as ei:
        load_yaml("a: [1, 2\nb: 3\n", "f.yaml")
    assert ei.value.problem_mark is not None


def test_empty_document():
    data, _, problems = load_yaml("# nothing\n", "f.yaml")
    assert data is None and not problems
