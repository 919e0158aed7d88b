"""The file primitives: the AF_UNIX address of a socket at any depth."""

from __future__ import annotations

import os
import socket

import pytest

from consolidator.files import SUN_PATH_MAX, unix_address


def test_a_short_path_is_its_own_address(tmp_path):
    with unix_address(tmp_path / "a.sock") as addr:
        assert addr == str(tmp_path / "a.sock")


def test_a_socket_deeper_than_sun_path_is_bound_and_reached_where_its_path_says(tmp_path):
    deep = tmp_path / ("d" * 100) / ("e" * 100)
    deep.mkdir(parents=True)
    path = deep / "api.sock"
    assert len(os.fsencode(path)) > SUN_PATH_MAX
    with socket.socket(socket.AF_UNIX) as plain, pytest.raises(OSError):
        plain.bind(str(path))                    # what the kernel says without it
    with socket.socket(socket.AF_UNIX) as server:
        with unix_address(path) as addr:
            assert len(addr) <= SUN_PATH_MAX and addr.startswith("/proc/self/fd/")
            server.bind(addr)
        server.listen(1)
        assert path.is_socket()                  # made where the path says
        with socket.socket(socket.AF_UNIX) as client:
            with unix_address(path) as addr:
                client.connect(addr)
            conn, _ = server.accept()
            with conn:
                client.sendall(b"ping")
                assert conn.recv(4) == b"ping"
    fds_before = len(os.listdir("/proc/self/fd"))
    with unix_address(path):
        pass
    assert len(os.listdir("/proc/self/fd")) == fds_before        # the directory's fd closed


def test_a_socket_name_too_long_even_so_is_refused_by_name(tmp_path):
    (tmp_path / ("d" * 100)).mkdir()
    with pytest.raises(OSError, match="socket name too long"):
        with unix_address(tmp_path / ("d" * 100) / ("s" * 100)):
            pass
