"""Loopback ports for a local server: is one free, pick one that is."""
from __future__ import annotations

import socket


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def free_port(taken: set[int] = frozenset()) -> int:
    """A port the OS calls free now; `taken` avoids handing the same one out twice. Another process may
    still take it before the server binds it (the server start retries that race)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port not in taken:
            return port
