from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consolidator.units import (UnitError, format_duration, format_size, human_size, human_uptime,
                                parse_duration, parse_size)

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


@pytest.mark.parametrize("text,expected", [
    ("512MiB", 512 * MiB), ("1GiB", GiB), ("1G", GiB), ("1024M", GiB), ("1g", GiB),
    ("1 GiB", GiB), ("1.5GiB", 3 * 512 * MiB), ("4096", 4096), (4096, 4096), ("0", 0),
    ("64K", 64 * KiB), ("2T", 2 << 40), ("2TiB", 2 << 40), ("100B", 100), (" 8M ", 8 * MiB),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text,fragment", [
    ("1GB", "ambiguous"), ("1 MB", "ambiguous"), ("12 parsecs", "unknown size unit"),
    ("-1G", "cannot parse"), ("", "cannot parse"), ("1.3B", "whole number of bytes"),
    (True, "boolean"), (1.5, "needs a unit"), (-5, "negative"), ([1], "expected a size"),
    ("G", "cannot parse"),
])
def test_parse_size_errors(text, fragment):
    with pytest.raises(UnitError, match=fragment):
        parse_size(text)


def test_g_means_the_same_everywhere():
    assert parse_size("1G") == parse_size("1GiB") == parse_size("1024M") == parse_size("1024MiB")


@given(st.integers(min_value=0, max_value=1 << 62))
def test_format_then_parse_round_trips(n):
    assert parse_size(format_size(n)) == n


@given(st.integers(min_value=0, max_value=1 << 20),
       st.sampled_from(["", "B", "K", "KiB", "M", "MiB", "G", "GiB", "T", "TiB"]))
def test_parse_then_format_is_exact(num, unit):
    n = parse_size(f"{num}{unit}")
    assert parse_size(format_size(n)) == n
    assert format_size(n) == format_size(parse_size(format_size(n)))


@pytest.mark.parametrize("n,text", [(0, "0"), (GiB, "1GiB"), (1536 * MiB, "1536MiB"),
                                    (1023, "1023"), (1 << 50, "1PiB")])
def test_format_size_exact(n, text):
    assert format_size(n) == text


@pytest.mark.parametrize("n,text", [(None, "-"), (0, "0 B"), (1536 * MiB, "1.5 GiB"),
                                    (200 * MiB, "200 MiB"), (-MiB, "-1 MiB")])
def test_human_size(n, text):
    assert human_size(n) == text


@pytest.mark.parametrize("text,secs", [("1s", 1.0), ("500ms", 0.5), ("2m", 120.0), ("1h", 3600.0),
                                       ("7d", 7 * 86400.0), (3, 3.0), ("0.25", 0.25)])
def test_parse_duration(text, secs):
    assert parse_duration(text) == secs


@pytest.mark.parametrize("bad", ["1x", "fast", True, -1, float("nan")])
def test_parse_duration_errors(bad):
    with pytest.raises(UnitError):
        parse_duration(bad)


@given(st.integers(min_value=0, max_value=10 * 86400))
def test_duration_round_trips(s):
    text = format_duration(s)
    total = 0.0
    import re
    for num, unit in re.findall(r"(\d+)(ms|s|m|h|d)", text):
        total += parse_duration(f"{num}{unit}")
    assert total == s


@pytest.mark.parametrize("seconds,text", [
    (None, "-"), (0, "0s"), (0.1, "0s"), (0.9, "0s"), (42.7, "42s"), (307, "5m07s"),
    (3600, "1h00m"), (3 * 3600 + 125, "3h02m"), (2 * 86400 + 5 * 3600 + 59, "2d05h"),
])
def test_uptimes_read_the_same_way_in_every_row(seconds, text):
    assert human_uptime(seconds) == text
