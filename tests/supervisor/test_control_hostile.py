"""The control socket is a new input path: whatever a local client writes to it (not JSON, JSON that
is not a request, an unknown command, a line past the limit, a connection that says nothing and
goes), the parent answers one refusal or nothing, keeps serving, and still reloads."""

from __future__ import annotations

import json
import socket
import stat
from collections.abc import Callable

import httpx

from proxy.supervisor.control import MAX_REQUEST
from tests.clirun import strangler
from tests.supervisor.conftest import Supervised


def exchange(path: str, payload: bytes) -> bytes:
    """Send ``payload`` and read until the parent closes (its answer, or nothing)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(path)
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)  # an oversized line without its newline ends here
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        return data


def test_what_a_local_client_writes_to_the_control_socket_never_stops_the_parent(
    supervised: Callable[..., Supervised],
) -> None:
    sup = supervised()
    path = str(sup.socket)
    assert stat.S_IMODE(sup.socket.stat().st_mode) == 0o600  # only its user can connect
    refused = {
        "ok": False,
        "result": "invalid",
        "error": "unknown request (commands: reload, status, upgrade)",
    }
    for payload in (
        b"not json\n",
        b"[1, 2]\n",
        b'"reload"\n',
        b'{"command": ["reload"]}\n',
        b'{"command": "shutdown"}\n',
        b'{"cmd": "reload"}\n',
        b"\xff\xfe\x00garbage\n",
    ):
        assert json.loads(exchange(path, payload)) == refused, payload[:40]
    # past the limit without a newline: read up to the limit, then refused and closed (the bytes
    # left unread make the close a reset, which may reach the client before the refusal or while it
    # still writes)
    try:
        assert json.loads(exchange(path, b"{" * (MAX_REQUEST * 4))) == refused
    except (ConnectionResetError, BrokenPipeError):
        pass
    # a client that connects and goes without a word, and one that never finishes its line
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as quiet:
        quiet.connect(path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as slow:
        slow.connect(path)
        slow.sendall(b'{"command": "sta')
        # meanwhile the parent answers others, serves, and reloads
        assert httpx.get(sup.proxy.url + "/echo", timeout=5).status_code == 200
        assert sup.status()["generation"] == 1
        done = strangler("reload", "--socket", path)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("reloaded: generation 2, 1 worker ready in "), done.stdout
    assert httpx.get(sup.proxy.url + "/echo", timeout=5).status_code == 200
