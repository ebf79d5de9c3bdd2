"""``network.socket_receive_buffer_kb``: the receive buffer of each client connection."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest
import trio
from conftest import MakeConfig, wait_until
from tcpclient import connect

from trio_embarcadero import open_broker
from trio_embarcadero.broker import Broker
from trio_embarcadero.config import load_config
from trio_embarcadero.errors import ConfigError
from trio_embarcadero.transport import receive_buffer_cap

# Not a multiple of the kernel's default (tcp_rmem's middle value, 128 KiB
# on most systems): what Linux reports for it (twice the value set) cannot
# pass for an untouched buffer.
KIB = 100


def _autotuned_start() -> int:
    """The receive buffer a TCP socket starts with when nobody sets one."""
    return int(Path("/proc/sys/net/ipv4/tcp_rmem").read_text().split()[1])


async def _served_receive_buffer(broker: Broker) -> int:
    """The SO_RCVBUF of the broker's end of a new connection."""
    async with await connect(broker.port):
        await wait_until(lambda: len(broker.connections) == 1)
        (connection,) = broker.connections
        assert isinstance(connection.stream, trio.SocketStream)
        return int(connection.stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))


def test_the_cap_is_net_core_rmem_max() -> None:
    assert receive_buffer_cap() == int(Path("/proc/sys/net/core/rmem_max").read_text())


async def test_client_connections_get_the_configured_receive_buffer(
    make_config: MakeConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Whatever this machine's cap: the broker sets the buffer when it may
    # (a cap below the setting is the test after next), and Linux caps what
    # it is asked for at rmem_max and doubles it for its own bookkeeping.
    cap = receive_buffer_cap()
    assert cap is not None
    monkeypatch.setattr("trio_embarcadero.broker.service.receive_buffer_cap", lambda: None)
    with trio.fail_after(30):
        async with open_broker(make_config(network__socket_receive_buffer_kb=KIB)) as broker:
            assert await _served_receive_buffer(broker) == 2 * min(KIB * 1024, cap)


async def test_zero_leaves_the_receive_buffer_to_the_kernel(make_config: MakeConfig) -> None:
    with trio.fail_after(30):
        async with open_broker(make_config(network__socket_receive_buffer_kb=0)) as broker:
            assert await _served_receive_buffer(broker) == _autotuned_start()


async def test_a_cap_below_the_setting_keeps_the_autotuning_and_says_why(
    make_config: MakeConfig, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Capped at rmem_max, the buffer would be smaller than the kernel makes it.
    monkeypatch.setattr("trio_embarcadero.broker.service.receive_buffer_cap", lambda: 65536)
    caplog.set_level(logging.INFO, logger="trio_embarcadero")
    with trio.fail_after(30):
        async with open_broker(make_config(network__socket_receive_buffer_kb=KIB)) as broker:
            assert await _served_receive_buffer(broker) == _autotuned_start()
    (message,) = [r.getMessage() for r in caplog.records if "receive buffers" in r.getMessage()]
    assert "net.core.rmem_max (65536 B) is below network.socket_receive_buffer_kb (100 KiB)" in (
        message
    )
    assert "raise net.core.rmem_max" in message


def test_the_default_is_4_mib_and_bad_sizes_are_refused() -> None:
    assert load_config(env={}).network.socket_receive_buffer_kb == 4096
    for bad, problem in (
        (-1, "'socket_receive_buffer_kb' must be >= 0: -1"),
        (1 << 21, f"'socket_receive_buffer_kb' must be <= {1 << 20}: {1 << 21}"),
        ("4M", "expected int"),
    ):
        with pytest.raises(ConfigError) as info:
            load_config(env={}, overrides={"network.socket_receive_buffer_kb": bad})
        (found,) = info.value.problems
        assert problem in found
        assert "$.network.socket_receive_buffer_kb" in found
