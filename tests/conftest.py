"""Shared fixtures: small broker configs on private CXL files."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator

import pytest
import trio

from trio_embarcadero.config import Config, load_config
from trio_embarcadero.log import remove_region

# The brokers tests start as processes run with streaming copies set up from
# the start, as `serve` would set them up for itself: without it, each would
# start Python twice (serve runs itself again with this tunable).
os.environ.setdefault("GLIBC_TUNABLES", "glibc.cpu.x86_non_temporal_threshold=0x40000")

MakeConfig = Callable[..., Config]


@pytest.fixture
def cxl_path() -> Iterator[str]:
    """A fresh CXL file path under /dev/shm, removed (with its lock file) after the test."""
    path = f"/dev/shm/trio-embarcadero-test-{uuid.uuid4().hex[:12]}"
    yield path
    remove_region(path)


@pytest.fixture
def make_config(cxl_path: str) -> MakeConfig:
    """Build a small test config; keyword arguments are dotted-key overrides.

    Defaults: ephemeral port, a 64 MiB region of 8 MiB segments without
    prefaulting, 8 staging buffers of 1 MiB, short timeouts.
    """

    def make(**overrides: object) -> Config:
        values: dict[str, object] = {
            "broker.port": 0,
            "cxl.path": cxl_path,
            "cxl.size_mb": 64,
            "cxl.segment_mb": 8,
            "cxl.prefault": False,
            "network.staging_pool_buffer_size_mb": 1,
            "network.staging_pool_num_buffers": 8,
            "network.shutdown_grace_s": 2.0,
            "network.ack_connect_timeout_s": 2.0,
        }
        values.update({k.replace("__", "."): v for k, v in overrides.items()})
        return load_config(None, env={}, overrides=values)

    return make


async def wait_until(predicate: Callable[[], bool], *, poll: float = 0.01) -> None:
    """Wait for a broker-side condition that no event announces (bound it with fail_after)."""
    while True:
        if predicate():
            return
        await trio.sleep(poll)
