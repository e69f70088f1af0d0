"""The job's check that its teacher port is free (kdjob.teacher.check_port_free), on real loopback sockets."""
from __future__ import annotations

import socket

import pytest

from kdserve.config import ConfigError
from kdjob.teacher import check_port_free

pytestmark = pytest.mark.unit


def time_wait_port() -> int:
    """A port whose only socket is a server-side TIME_WAIT: the server closed its connection first, as a
    teacher that was just stopped does. The server binds with SO_REUSEADDR, as gRPC's servers do (Linux lets
    a new socket take the port only when every socket on it, the TIME_WAIT ones included, allows reuse)."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    conn, _ = srv.accept()
    conn.close()
    assert client.recv(1) == b""  # the server's FIN has arrived: its side goes to TIME_WAIT
    client.close()
    srv.close()
    return port


def test_a_port_a_teacher_just_left_is_free():
    port = time_wait_port()
    with socket.socket() as plain, pytest.raises(OSError):  # why a plain bind was the wrong probe
        plain.bind(("127.0.0.1", port))
    check_port_free("127.0.0.1", port)


def test_a_listening_teacher_still_holds_its_port():
    with socket.socket() as other:  # as gRPC servers bind
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        with pytest.raises(ConfigError) as err:
            check_port_free("127.0.0.1", port)
    msg = str(err.value)
    assert msg.startswith(f"teacher.grpc_port: port {port} on 127.0.0.1 is in use") and "\n" not in msg
