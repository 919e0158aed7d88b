"""Every rule of the inventory has a bad file in tests/data/bad/ declaring the exact
``LINE:COL path CODE`` of each error it must produce (``# expect:`` lines), and every
rule's code appears in that corpus."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from consolidator.cli.main import cli
from consolidator.errors import InventoryError
from consolidator.hostfacts import HostFacts
from consolidator.inventory.codes import CODES
from consolidator.model import load_fleet

BAD = Path(__file__).resolve().parent.parent / "data" / "bad"
FILES = sorted(BAD.glob("*.yaml"))
# A host like the CI machines: 2 CPUs, and 8 GiB so sizes in the files stay readable.
FACTS = HostFacts(cpus=(0, 1), memory_total=8 << 30)
def text_of(path: Path) -> str:
    """A corpus entry's expectations: in it, or (a link to a device, a FIFO: nothing to
    read) in the ``.expect`` file beside it."""
    src = path if path.is_file() else path.with_suffix(".expect")
    return src.read_bytes().decode("latin-1")     # one file is not UTF-8 on purpose


CLI_FILES = [f for f in FILES if "# host-dependent" not in text_of(f)]
EXPECT = re.compile(r"^# expect: (\d+):(\d+) (\S+) ([A-Z]\d{3})$", re.M)
FACTS_LINE = re.compile(r"^# facts: (\w+)=(true|false)$", re.M)


def facts_of(path: Path) -> HostFacts:
    """The fixed facts, with what the file's ``# facts: key=false`` lines change (a host
    fact the corpus cannot make true or false on the machine that runs it)."""
    from dataclasses import replace
    return replace(FACTS, **{k: v == "true" for k, v in FACTS_LINE.findall(text_of(path))})


def expected(path: Path) -> list[tuple[int, int, str, str]]:
    text = text_of(path)
    return sorted((int(a), int(b), c, code) for a, b, c, code in EXPECT.findall(text))


def test_corpus_is_complete() -> None:
    for f in FILES:
        assert expected(f), f"{f.name} has no '# expect: LINE:COL path CODE' line"


def test_every_rule_has_a_bad_inventory() -> None:
    seen = {code for f in FILES for *_, code in expected(f)}
    assert sorted(set(CODES) - seen) == [], "rules without a file in tests/data/bad"
    assert sorted(seen - set(CODES)) == [], "codes in the corpus that name no rule"


@pytest.mark.timeout(10)             # an alias bomb or a device must not hold the loader
@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
def test_bad_inventory_errors_at_exact_place(path: Path, tmp_path: Path) -> None:
    with pytest.raises(InventoryError) as ei:          # an empty state dir, as validate's
        load_fleet(path, facts_of(path), state_dir=tmp_path)
    got = sorted((p.line, p.col, p.path, p.code) for p in ei.value.problems)
    assert got == expected(path), "\n".join(p.render() for p in ei.value.problems)
    for p in ei.value.problems:
        assert p.file == str(path)
        assert p.message
        assert p.render().endswith(f" [{p.code}]")


@pytest.mark.parametrize("path", CLI_FILES, ids=[f.stem for f in CLI_FILES])
def test_validate_cli_exit_2_and_file_line_col(path: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(cli, ["--state-dir", str(tmp_path), "validate", "-f", str(path)])
    assert res.exit_code == 2, res.output
    line, col, field, code = expected(path)[0]
    assert f"{path}:{line}:{col}: {field}: " in res.output
    assert f"[{code}]" in res.output
    assert "Traceback" not in res.output
    assert "nothing was applied" in res.output


def test_unknown_key_suggests() -> None:
    with pytest.raises(InventoryError) as ei:
        load_fleet(BAD / "unknown-key.yaml", FACTS)
    (p,) = ei.value.problems
    assert p.message == "unknown key 'memroy'"
    assert p.hint == "did you mean 'memory'?"


def test_duplicate_key_names_first_place() -> None:
    with pytest.raises(InventoryError) as ei:
        load_fleet(BAD / "duplicate-key.yaml", FACTS)
    assert "first defined at line 3, column 3" in ei.value.problems[0].message


def test_all_errors_reported_at_once() -> None:
    with pytest.raises(InventoryError) as ei:
        load_fleet(BAD / "all-at-once.yaml", FACTS)
    assert len(ei.value.problems) == 5


def test_the_readme_lists_every_rule_as_it_is():
    readme = (BAD.parents[2] / "README.md").read_text()
    for code, what in CODES.items():
        assert f"`{code}` {what}" in readme, code
