"""Shared pytest fixtures.

* No network: sockets may only connect to loopback (07 §5.4). Jupiter, IERS and coordinate tests
  must pass with this guard on.
* Simulated archives (``test-tiny``, ``test-small``) are made once per session (section below).
"""

from __future__ import annotations

import socket

import pytest

# --------------------------------------------------------------------------------------------------
# No network except loopback
# --------------------------------------------------------------------------------------------------
_LOOPBACK_HOSTS = {"127.0.0.1", "::1", "localhost", "0.0.0.0"}
_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex
_real_getaddrinfo = socket.getaddrinfo


def _check_address(address) -> None:
    if isinstance(address, tuple) and address:
        host = str(address[0])
        if host not in _LOOPBACK_HOSTS and not host.startswith("127."):
            raise OSError(f"network access to {host} is disabled in tests")


def _guarded_connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _check_address(address)
    return _real_connect(self, address)


def _guarded_connect_ex(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _check_address(address)
    return _real_connect_ex(self, address)


def _guarded_getaddrinfo(host, *args, **kwargs):
    if host is not None and str(host) not in _LOOPBACK_HOSTS and not str(host).startswith("127."):
        raise socket.gaierror(f"name resolution of {host} is disabled in tests")
    return _real_getaddrinfo(host, *args, **kwargs)


@pytest.fixture(autouse=True, scope="session")
def _no_network():
    """Disable non-loopback network access for the whole session."""
    socket.socket.connect = _guarded_connect
    socket.socket.connect_ex = _guarded_connect_ex
    socket.getaddrinfo = _guarded_getaddrinfo
    try:
        yield
    finally:
        socket.socket.connect = _real_connect
        socket.socket.connect_ex = _real_connect_ex
        socket.getaddrinfo = _real_getaddrinfo


# --------------------------------------------------------------------------------------------------
# Simulated archives (made once per session)
# --------------------------------------------------------------------------------------------------
