"""A state dir root cannot trust is refused before anything is written in it."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys

import pytest

from consolidator.errors import StateError
from consolidator.state import StateDir

pytestmark = pytest.mark.usefixtures("need_root")


def run(state, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "consolidator", "--state-dir", str(state),
                           *args], capture_output=True, text=True, timeout=60)


def test_a_state_dir_another_user_owns_is_refused_and_its_links_not_followed(tmp_path):
    """Tried before: as uid 65534, a state dir holding supervisor -> /tmp/victim made the
    root supervisor chmod the victim and write into it."""
    nobody = pwd.getpwnam("nobody")
    victim = tmp_path / "victim"
    victim.mkdir(mode=0o755)
    state = tmp_path / "state"
    state.mkdir()
    (state / "supervisor").symlink_to(victim)
    os.chown(state, nobody.pw_uid, nobody.pw_gid)
    os.lchown(state / "supervisor", nobody.pw_uid, nobody.pw_gid)
    res = run(state, "status")
    assert res.returncode == 1, res.stderr
    assert f"is owned by uid {nobody.pw_uid}" in res.stderr
    assert list(victim.iterdir()) == [] and oct(victim.stat().st_mode & 0o777) == "0o755"


@pytest.mark.parametrize("setup,said", [
    (lambda s: os.chmod(s, 0o777), "is writable by group or others"),
    (lambda s: ((s / "guests").rmdir(), (s / "guests").symlink_to("/etc")), "not a directory"),
    (lambda s: os.chmod(s.parent, 0o777), "may be changed by others"),
])
def test_loose_state_dirs_are_refused(tmp_path, setup, said):
    parent = tmp_path / "p"
    parent.mkdir(mode=0o755)
    state = parent / "state"
    StateDir(state).ensure()
    setup(state)
    with pytest.raises(StateError, match=said):
        StateDir(state).ensure()


def test_the_usual_places_are_accepted(tmp_path):
    StateDir(tmp_path / "state").ensure()                 # below /tmp: sticky, so fine
    assert oct((tmp_path / "state").stat().st_mode & 0o777) == "0o700"
