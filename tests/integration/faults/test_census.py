"""The fault suite's census counts a process's pooled connections on its own sockets
(`peer_ports`): it must see a connection to a port, and stop seeing it once it is closed."""

from __future__ import annotations

import os
import socket

from tests.integration.faults.harness import peer_ports


def test_peer_ports_counts_this_process_s_connections_to_a_port() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        accepted = [listener.accept()[0] for _ in clients]
        try:
            assert peer_ports(os.getpid()).count(port) == 3
            clients.pop().close()
            assert peer_ports(os.getpid()).count(port) == 2
        finally:
            for s in [*clients, *accepted]:
                s.close()
        assert peer_ports(os.getpid()).count(port) == 0
