"""Tests of trio_embarcadero.config: layers, strict types, every problem at once."""

import copy
import os
import pickle
import re
import tomllib
from pathlib import Path

import attrs
import pytest

from trio_embarcadero.config import (
    ENV_PREFIX,
    LOG_LEVELS,
    SEED_ENV_VARS,
    BrokerConfig,
    Config,
    CxlConfig,
    HttpConfig,
    LoggingConfig,
    NetworkConfig,
    StorageConfig,
    TopicOverride,
    TopicsConfig,
    TopicSettings,
    config_to_toml,
    load_config,
)
from trio_embarcadero.errors import ConfigError, EmbarcaderoError

MIB = 2**20


def write(tmp_path: Path, text: str, name: str = "broker.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(
    tmp_path: Path,
    text: str | None = None,
    *,
    env: dict[str, str] | None = None,
    overrides: dict[str, object] | None = None,
) -> list[str]:
    path = None if text is None else write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={} if env is None else env, overrides=overrides)
    return info.value.problems


# --- defaults ----------------------------------------------------------------


def test_defaults() -> None:
    config = load_config(env={})
    assert config == Config()
    assert config.broker == BrokerConfig(id=0, host="127.0.0.1", port=1214)
    assert config.broker.data_port == 1214
    net = config.network
    assert net.use_nonblocking is True
    assert net.staging_pool_buffer_size_mb == 4
    assert net.staging_pool_num_buffers == 32
    assert net.num_publish_receive_threads == 4
    assert net.num_cxl_allocation_workers == 2
    assert net.max_batch_bytes is None
    assert net.allocation_queue_size == 128
    assert net.pause_high_watermark == 0.875
    assert net.resume_low_watermark == 0.5
    assert (net.backoff_initial_us, net.backoff_max_us, net.backoff_max_retries) == (100, 1600, 10)
    assert net.handshake_timeout_s == 10.0
    assert net.header_timeout_s == 2.0
    assert net.batch_timeout_s == 30.0
    assert net.payload_stall_timeout_s == 1.0
    assert net.idle_timeout_s == 0.0
    assert net.ack_connect_timeout_s == 5.0
    assert net.shutdown_grace_s == 5.0
    assert net.stats_interval_s == 5.0
    assert net.max_connections == 1024
    assert net.max_connections_per_host == 256
    assert net.subscriber_send_timeout_s == 10.0
    assert net.max_buffers_per_connection == 8
    assert net.staging_buffer_bytes == 4 * MIB
    assert net.effective_max_batch_bytes == 4 * MIB
    assert config.cxl == CxlConfig(
        path="/dev/shm/trio-embarcadero-0",
        size_mb=1024,
        segment_mb=32,
        segment_unit_kb=64,
        max_topics=1024,
        max_brokers=4,
        max_inflight_batches=1024,
        prefault=True,
        mode=0o600,
        allow_weak_memory_ordering=False,
    )
    assert config.cxl.size_bytes == 1024 * MIB
    assert config.cxl.segment_bytes == 32 * MIB
    assert config.storage == StorageConfig(
        dir="", sync_interval_ms=5.0, sync_bytes=64 * MIB, mode=0o600
    )
    assert config.http == HttpConfig(enabled=True, host="127.0.0.1", port=9214)
    assert config.http.port_for(config.broker) == 9214
    assert config.logging == LoggingConfig(level="INFO", format="text")
    assert config.topics == TopicsConfig(
        defaults=TopicSettings(retention_bytes=-1, retention_ms=-1), overrides={}
    )
    assert config.topics.settings_for("orders") == TopicSettings()


def test_defaults_ignore_unrelated_environment() -> None:
    env = {"PATH": "/bin", "EMBARCADERO_SCALOG_SEQ_PORT": "x", "TRIO_EMBARCADEROX": "1"}
    assert load_config(env=env) == Config()


def test_env_none_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRIO_EMBARCADERO_BROKER__PORT", "4321")
    assert load_config().broker.port == 4321
    monkeypatch.setenv("TRIO_EMBARCADERO_BROKER__PORT", "x")
    with pytest.raises(ConfigError):
        load_config()


def test_config_error_is_an_embarcadero_error() -> None:
    assert issubclass(ConfigError, EmbarcaderoError)


# --- derived values ----------------------------------------------------------


@pytest.mark.parametrize(
    ("port", "broker_id", "data_port"),
    [(1214, 0, 1214), (1214, 3, 1217), (0, 5, 0), (65535, 0, 65535), (65504, 31, 65535)],
)
def test_data_port(port: int, broker_id: int, data_port: int) -> None:
    assert BrokerConfig(port=port, id=broker_id).data_port == data_port


def test_effective_max_batch_bytes_explicit() -> None:
    net = NetworkConfig(staging_pool_buffer_size_mb=2, max_batch_bytes=1000)
    assert net.staging_buffer_bytes == 2 * MIB
    assert net.effective_max_batch_bytes == 1000


def test_log_level_any_case_stored_upper(tmp_path: Path) -> None:
    assert LoggingConfig(level="debug").level == "DEBUG"
    path = write(tmp_path, '[logging]\nlevel = "Warning"\n')
    assert load_config(path, env={}).logging.level == "WARNING"
    assert LOG_LEVELS == ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


# --- file ----------------------------------------------------------------------


FULL_FILE = """
[broker]
id = 2
host = "0.0.0.0"
port = 7000

[network]
use_nonblocking = false
staging_pool_buffer_size_mb = 8
staging_pool_num_buffers = 16
num_publish_receive_threads = 3
num_cxl_allocation_workers = 5
max_batch_bytes = 12345678
allocation_queue_size = 64
pause_high_watermark = 1
resume_low_watermark = 0
backoff_initial_us = 50
backoff_max_us = 50
backoff_max_retries = 0
handshake_timeout_s = 1.5
batch_timeout_s = 2
idle_timeout_s = 60.0
ack_connect_timeout_s = 0.25
shutdown_grace_s = 0
stats_interval_s = 0.5
max_connections = 10
max_buffers_per_connection = 2

[cxl]
path = "/tmp/cxl-test"
size_mb = 64
segment_mb = 64
max_topics = 3
max_brokers = 32
max_inflight_batches = 7
prefault = false

[storage]
dir = "/var/lib/emb"
sync_interval_ms = 1
sync_bytes = 4096

[http]
enabled = false
host = "::1"
port = 8000

[logging]
level = "error"
format = "JSON"

[topics]
retention_ms = 86400000

[topics."orders.eu"]
retention_bytes = 1000000
"""


def test_file_values(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FULL_FILE), env={})
    assert config == Config(
        broker=BrokerConfig(id=2, host="0.0.0.0", port=7000),
        network=NetworkConfig(
            use_nonblocking=False,
            staging_pool_buffer_size_mb=8,
            staging_pool_num_buffers=16,
            num_publish_receive_threads=3,
            num_cxl_allocation_workers=5,
            max_batch_bytes=12345678,
            allocation_queue_size=64,
            pause_high_watermark=1.0,
            resume_low_watermark=0.0,
            backoff_initial_us=50,
            backoff_max_us=50,
            backoff_max_retries=0,
            handshake_timeout_s=1.5,
            batch_timeout_s=2.0,
            idle_timeout_s=60.0,
            ack_connect_timeout_s=0.25,
            shutdown_grace_s=0.0,
            stats_interval_s=0.5,
            max_connections=10,
            max_buffers_per_connection=2,
        ),
        cxl=CxlConfig(
            path="/tmp/cxl-test",
            size_mb=64,
            segment_mb=64,
            max_topics=3,
            max_brokers=32,
            max_inflight_batches=7,
            prefault=False,
        ),
        storage=StorageConfig(dir="/var/lib/emb", sync_interval_ms=1.0, sync_bytes=4096),
        http=HttpConfig(enabled=False, host="::1", port=8000),
        logging=LoggingConfig(level="ERROR", format="json"),
        topics=TopicsConfig(
            defaults=TopicSettings(retention_ms=86_400_000),
            overrides={"orders.eu": TopicOverride(retention_bytes=1_000_000)},
        ),
    )
    # TOML integers given for float keys become floats.
    assert type(config.network.batch_timeout_s) is float
    assert type(config.network.pause_high_watermark) is float
    assert config.broker.data_port == 7002
    assert config.http.port_for(config.broker) == 8002


@pytest.mark.parametrize(
    ("overrides", "port"),
    [
        ({}, 9214),
        ({"broker.id": 3}, 9217),
        ({"http.port": 8000, "broker.id": 1}, 8001),
        ({"http.port": 0, "broker.id": 1}, 0),
        # A broker on an ephemeral data port never takes a fixed HTTP port.
        ({"broker.port": 0, "broker.id": 2}, 0),
    ],
)
def test_http_port_per_broker_id(overrides: dict[str, object], port: int) -> None:
    config = load_config(env={}, overrides=overrides)
    assert config.http.port_for(config.broker) == port


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        (
            {"http.port": 65535, "broker.id": 1},
            "'port' + broker 'id' (the HTTP port) must be <= 65535: 65535 + 1 @ $.http.port",
        ),
        (
            {"http.port": 1214, "broker.id": 1},
            "'port' + broker 'id' (the HTTP port, 1215) must differ from the data port "
            "(broker.port + id): set http.port to another base port, e.g. 9214 @ $.http.port",
        ),
        ({"http.port": -1}, "'port' must be >= 0: -1 @ $.http.port"),
        ({"http.host": ""}, "'host' must not be empty @ $.http.host"),
        (
            {"logging.format": "xml"},
            "'format' must be in ('text', 'json') (got 'xml') @ $.logging.format",
        ),
    ],
)
def test_bad_http_and_log_format(overrides: dict[str, object], problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(env={}, overrides=overrides)
    assert [p.removesuffix(" (from override)") for p in info.value.problems] == [problem]


def test_http_off_needs_no_free_port() -> None:
    # Turned off, its port is not checked against the data port.
    config = load_config(env={}, overrides={"http.enabled": False, "http.port": 1214})
    assert not config.http.enabled
    env = {"TRIO_EMBARCADERO_HTTP__ENABLED": "off", "TRIO_EMBARCADERO_LOGGING__FORMAT": "json"}
    config = load_config(env=env)
    assert (config.http.enabled, config.logging.format) == (False, "json")


def test_partial_file_keeps_other_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "[network]\nstaging_pool_num_buffers = 7\n"), env={})
    assert config == Config(network=NetworkConfig(staging_pool_num_buffers=7))


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, ""), env={}) == Config()


def test_path_may_be_str(tmp_path: Path) -> None:
    path = write(tmp_path, "[broker]\nport = 9\n")
    assert load_config(str(path), env={}).broker.port == 9


# --- precedence ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("in_file", "in_env", "in_overrides", "expected"),
    [
        (False, False, False, 1214),
        (True, False, False, 2000),
        (False, True, False, 3000),
        (True, True, False, 3000),
        (False, False, True, 4000),
        (True, False, True, 4000),
        (True, True, True, 4000),
    ],
)
def test_precedence(
    tmp_path: Path, in_file: bool, in_env: bool, in_overrides: bool, expected: int
) -> None:
    path = write(tmp_path, "[broker]\nport = 2000\n") if in_file else None
    env = {"TRIO_EMBARCADERO_BROKER__PORT": "3000"} if in_env else {}
    overrides: dict[str, object] = {"broker.port": 4000} if in_overrides else {}
    assert load_config(path, env=env, overrides=overrides).broker.port == expected


def test_layers_merge_per_key(tmp_path: Path) -> None:
    path = write(tmp_path, "[broker]\nport = 2000\nid = 1\nhost = 'h'\n")
    config = load_config(
        path, env={"TRIO_EMBARCADERO_BROKER__ID": "2"}, overrides={"broker.host": "o"}
    )
    assert config.broker == BrokerConfig(port=2000, id=2, host="o")


# --- environment -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("var", "raw", "field", "value"),
    [
        ("EMBARCADERO_USE_NONBLOCKING", "false", "use_nonblocking", False),
        ("EMBARCADERO_STAGING_POOL_BUFFER_SIZE_MB", "2", "staging_pool_buffer_size_mb", 2),
        ("EMBARCADERO_STAGING_POOL_NUM_BUFFERS", "64", "staging_pool_num_buffers", 64),
        ("EMBARCADERO_NUM_PUBLISH_RECEIVE_THREADS", "9", "num_publish_receive_threads", 9),
        ("EMBARCADERO_NUM_CXL_ALLOCATION_WORKERS", "3", "num_cxl_allocation_workers", 3),
    ],
)
def test_seed_env_vars(var: str, raw: str, field: str, value: object) -> None:
    config = load_config(env={var: raw})
    assert getattr(config.network, field) == value
    assert attrs.evolve(config.network, **{field: getattr(Config().network, field)}) == (
        NetworkConfig()
    )


def test_seed_env_var_table() -> None:
    assert SEED_ENV_VARS == {
        "EMBARCADERO_USE_NONBLOCKING": "network.use_nonblocking",
        "EMBARCADERO_STAGING_POOL_BUFFER_SIZE_MB": "network.staging_pool_buffer_size_mb",
        "EMBARCADERO_STAGING_POOL_NUM_BUFFERS": "network.staging_pool_num_buffers",
        "EMBARCADERO_NUM_PUBLISH_RECEIVE_THREADS": "network.num_publish_receive_threads",
        "EMBARCADERO_NUM_CXL_ALLOCATION_WORKERS": "network.num_cxl_allocation_workers",
    }
    assert ENV_PREFIX == "TRIO_EMBARCADERO_"


def test_general_env_scheme() -> None:
    env = {
        "TRIO_EMBARCADERO_CXL__SIZE_MB": "64",
        "TRIO_EMBARCADERO_BROKER__PORT": "0",
        "TRIO_EMBARCADERO_BROKER__ID": "+3",
        "TRIO_EMBARCADERO_BROKER__HOST": "::1",
        "TRIO_EMBARCADERO_NETWORK__PAUSE_HIGH_WATERMARK": "0.75",
        "TRIO_EMBARCADERO_NETWORK__IDLE_TIMEOUT_S": "12",
        "TRIO_EMBARCADERO_NETWORK__MAX_BATCH_BYTES": "1048576",
        "TRIO_EMBARCADERO_NETWORK__USE_NONBLOCKING": "off",
        "TRIO_EMBARCADERO_CXL__PREFAULT": "no",
        "TRIO_EMBARCADERO_CXL__PATH": "/dev/shm/x y",
        "TRIO_EMBARCADERO_STORAGE__DIR": "",
        "TRIO_EMBARCADERO_STORAGE__SYNC_INTERVAL_MS": "2.5e1",
        "TRIO_EMBARCADERO_LOGGING__LEVEL": "debug",
    }
    config = load_config(env=env)
    assert config.cxl.size_mb == 64
    assert config.cxl.segment_mb == 32
    assert config.broker == BrokerConfig(port=0, id=3, host="::1")
    assert config.broker.data_port == 0
    assert config.network.pause_high_watermark == 0.75
    assert config.network.idle_timeout_s == 12.0
    assert type(config.network.idle_timeout_s) is float
    assert config.network.max_batch_bytes == MIB
    assert config.network.use_nonblocking is False
    assert config.cxl.prefault is False
    assert config.cxl.path == "/dev/shm/x y"
    assert config.storage.dir == ""
    assert config.storage.sync_interval_ms == 25.0
    assert config.logging.level == "DEBUG"


def test_general_name_beats_seed_name() -> None:
    env = {
        "EMBARCADERO_STAGING_POOL_NUM_BUFFERS": "10",
        "TRIO_EMBARCADERO_NETWORK__STAGING_POOL_NUM_BUFFERS": "20",
    }
    assert load_config(env=env).network.staging_pool_num_buffers == 20


def test_valid_general_name_beats_bad_seed_value_but_seed_error_is_reported() -> None:
    env = {
        "EMBARCADERO_STAGING_POOL_NUM_BUFFERS": "ten",
        "TRIO_EMBARCADERO_NETWORK__STAGING_POOL_NUM_BUFFERS": "20",
    }
    assert problems_of(Path(), env=env) == [
        "invalid value for type, expected int: 'ten' @ $.network.staging_pool_num_buffers "
        "(from EMBARCADERO_STAGING_POOL_NUM_BUFFERS)"
    ]


@pytest.mark.parametrize("raw", ["1", "true", "TRUE", "True", "yes", "Yes", "on", "ON"])
def test_env_bool_true_spellings(tmp_path: Path, raw: str) -> None:
    # Both default to true, so the file turns them off first.
    path = write(tmp_path, "[network]\nuse_nonblocking = false\n[cxl]\nprefault = false\n")
    env = {"EMBARCADERO_USE_NONBLOCKING": raw, "TRIO_EMBARCADERO_CXL__PREFAULT": raw}
    config = load_config(path, env=env)
    assert config.network.use_nonblocking is True
    assert config.cxl.prefault is True


@pytest.mark.parametrize("raw", ["0", "false", "FALSE", "False", "no", "NO", "off", "Off"])
def test_env_bool_false_spellings(raw: str) -> None:
    env = {"EMBARCADERO_USE_NONBLOCKING": raw, "TRIO_EMBARCADERO_CXL__PREFAULT": raw}
    config = load_config(env=env)
    assert config.network.use_nonblocking is False
    assert config.cxl.prefault is False


@pytest.mark.parametrize("raw", ["", "2", "y", "n", "truee", " true", "enabled"])
def test_env_bool_bad(raw: str) -> None:
    assert problems_of(Path(), env={"EMBARCADERO_USE_NONBLOCKING": raw}) == [
        f"invalid value for type, expected bool: {raw!r} @ $.network.use_nonblocking "
        "(from EMBARCADERO_USE_NONBLOCKING)"
    ]


@pytest.mark.parametrize("raw", ["2.5", "true", "", " 3", "3 ", "0x10", "1_000", "1e3", "٣"])
def test_env_bad_int(raw: str) -> None:
    assert problems_of(Path(), env={"EMBARCADERO_STAGING_POOL_NUM_BUFFERS": raw}) == [
        f"invalid value for type, expected int: {raw!r} @ $.network.staging_pool_num_buffers "
        "(from EMBARCADERO_STAGING_POOL_NUM_BUFFERS)"
    ]


def test_env_bad_int_general_name() -> None:
    assert problems_of(Path(), env={"TRIO_EMBARCADERO_BROKER__PORT": "80.0"}) == [
        "invalid value for type, expected int: '80.0' @ $.broker.port "
        "(from TRIO_EMBARCADERO_BROKER__PORT)"
    ]


@pytest.mark.parametrize("raw", ["nan", "inf", "-inf", "Infinity", "abc", ""])
def test_env_bad_float(raw: str) -> None:
    assert problems_of(Path(), env={"TRIO_EMBARCADERO_NETWORK__BATCH_TIMEOUT_S": raw}) == [
        f"invalid value for type, expected float: {raw!r} @ $.network.batch_timeout_s "
        "(from TRIO_EMBARCADERO_NETWORK__BATCH_TIMEOUT_S)"
    ]


def test_env_bad_value_hides_the_file_value_it_replaces(tmp_path: Path) -> None:
    # The file's 0 is overridden, so only the environment's problem is shown.
    problems = problems_of(
        tmp_path,
        "[network]\nstaging_pool_num_buffers = 0\n",
        env={"EMBARCADERO_STAGING_POOL_NUM_BUFFERS": "x"},
    )
    assert problems == [
        "invalid value for type, expected int: 'x' @ $.network.staging_pool_num_buffers "
        "(from EMBARCADERO_STAGING_POOL_NUM_BUFFERS)"
    ]


# -- file modes -------------------------------------------------------------------------


def test_modes_are_octal_in_toml_and_the_environment(tmp_path: Path) -> None:
    path = write(tmp_path, "[cxl]\nmode = 0o640\n\n[storage]\nmode = 0o700\n")
    config = load_config(path, env={})
    assert (config.cxl.mode, config.storage.mode) == (0o640, 0o700)
    for raw in ("660", "0660", "0o660", "0O660"):
        env = {"TRIO_EMBARCADERO_CXL__MODE": raw, "TRIO_EMBARCADERO_STORAGE__MODE": raw}
        config = load_config(None, env=env)
        assert (config.cxl.mode, config.storage.mode) == (0o660, 0o660), raw


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("0o400", "0o400"),  # the owner could not write its own log
        ("0o200", "0o200"),
        ("0o4600", "0o4600"),  # setuid
        ("600", "0o1130"),  # decimal by mistake
        ("-1", "-0o1"),
    ],
)
def test_bad_modes_are_refused(tmp_path: Path, text: str, shown: str) -> None:
    message = (
        "'mode' must be a file mode from 0o600 to 0o777 that lets the owner read and write, "
        f"written in octal (TOML 0o600, environment 600 or 0o600): {shown}"
    )
    assert problems_of(tmp_path, f"[cxl]\nmode = {text}\n[storage]\nmode = {text}\n") == [
        f"{message} @ $.cxl.mode",
        f"{message} @ $.storage.mode",
    ]


@pytest.mark.parametrize("raw", ["", "8", "0o9", "rw-------", "0x180", " 600"])
def test_env_bad_mode(raw: str) -> None:
    assert problems_of(Path(), env={"TRIO_EMBARCADERO_CXL__MODE": raw}) == [
        f"invalid value for type, expected an octal file mode: {raw!r} @ $.cxl.mode "
        "(from TRIO_EMBARCADERO_CXL__MODE)"
    ]


def test_env_out_of_range_names_the_variable() -> None:
    assert problems_of(Path(), env={"TRIO_EMBARCADERO_BROKER__ID": "40"}) == [
        "'id' must be <= 31: 40 @ $.broker.id (from TRIO_EMBARCADERO_BROKER__ID)"
    ]


@pytest.mark.parametrize(
    "var",
    [
        "TRIO_EMBARCADERO_X",
        "TRIO_EMBARCADERO_",
        "TRIO_EMBARCADERO_NETWORK__NOPE",
        "TRIO_EMBARCADERO_NOPE__PORT",
        "TRIO_EMBARCADERO_BROKER_PORT",
        "TRIO_EMBARCADERO_BROKER__PORT__X",
        "TRIO_EMBARCADERO_broker__port",
    ],
)
def test_unknown_trio_embarcadero_env_var(var: str) -> None:
    assert problems_of(Path(), env={var: "1"}) == [
        "unknown environment variable (expected TRIO_EMBARCADERO_<SECTION>__<KEY> "
        f"naming a config key) @ $env.{var}"
    ]


# --- overrides -------------------------------------------------------------------


def test_overrides() -> None:
    config = load_config(
        env={},
        overrides={
            "broker.port": 0,
            "broker.id": 1,
            "logging.level": "critical",
            "cxl.path": "/tmp/x",
            "network.idle_timeout_s": 3,
        },
    )
    assert config.broker == BrokerConfig(port=0, id=1)
    assert config.logging.level == "CRITICAL"
    assert config.cxl.path == "/tmp/x"
    assert config.network.idle_timeout_s == 3.0


def test_override_none_resets_max_batch_bytes(tmp_path: Path) -> None:
    path = write(tmp_path, "[network]\nmax_batch_bytes = 100\n")
    assert load_config(path, env={}).network.max_batch_bytes == 100
    config = load_config(path, env={}, overrides={"network.max_batch_bytes": None})
    assert config.network.max_batch_bytes is None


def test_bad_overrides() -> None:
    problems = problems_of(
        Path(),
        overrides={
            "broker.port": "80",
            "broker.id": True,
            "broker.pot": 1,
            "port": 1,
            "cxl.size_mb": None,
            "logging.level": "verbose",
        },
    )
    assert problems == [
        "unknown key @ $.broker.pot (from override)",
        "unknown key @ $.port (from override)",
        "invalid value for type, expected int: True @ $.broker.id (from override)",
        "invalid value for type, expected int: '80' @ $.broker.port (from override)",
        "invalid value for type, expected int: None @ $.cxl.size_mb (from override)",
        "'level' must be in ('DEBUG', 'INFO', 'WARNING', 'ERROR', 'CRITICAL') "
        "(got 'VERBOSE') @ $.logging.level (from override)",
    ]


# --- bad values in the file ------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            "[network]\nstaging_pool_num_buffers = 2.5\n",
            "invalid value for type, expected int: 2.5 @ $.network.staging_pool_num_buffers",
        ),
        (
            "[network]\nstaging_pool_num_buffers = true\n",
            "invalid value for type, expected int: True @ $.network.staging_pool_num_buffers",
        ),
        (
            "[network]\nstaging_pool_num_buffers = '8'\n",
            "invalid value for type, expected int: '8' @ $.network.staging_pool_num_buffers",
        ),
        (
            "[network]\nmax_batch_bytes = 1.0\n",
            "invalid value for type, expected int: 1.0 @ $.network.max_batch_bytes",
        ),
        (
            "[network]\nuse_nonblocking = 1\n",
            "invalid value for type, expected bool: 1 @ $.network.use_nonblocking",
        ),
        (
            "[network]\nuse_nonblocking = 'true'\n",
            "invalid value for type, expected bool: 'true' @ $.network.use_nonblocking",
        ),
        (
            "[network]\nbatch_timeout_s = true\n",
            "invalid value for type, expected float: True @ $.network.batch_timeout_s",
        ),
        (
            "[network]\nbatch_timeout_s = '1.0'\n",
            "invalid value for type, expected float: '1.0' @ $.network.batch_timeout_s",
        ),
        (
            "[cxl]\npath = 5\n",
            "invalid value for type, expected str: 5 @ $.cxl.path",
        ),
        (
            "[broker]\nhost = ['a']\n",
            "invalid value for type, expected str: ['a'] @ $.broker.host",
        ),
        (
            "[network]\nstaging_pool_num_buffer = 8\n",
            "extra fields found (staging_pool_num_buffer) @ $.network",
        ),
        ("[netwrk]\nx = 1\n", "extra fields found (netwrk) @ $"),
        ("network = 5\n", "expected a table, got int: 5 @ $.network"),
        (
            "[network]\nstaging_pool_num_buffers = 0\n",
            "'staging_pool_num_buffers' must be > 0: 0 @ $.network.staging_pool_num_buffers",
        ),
        ("[broker]\nport = -1\n", "'port' must be >= 0: -1 @ $.broker.port"),
        ("[broker]\nport = 65536\n", "'port' must be <= 65535: 65536 @ $.broker.port"),
        ("[broker]\nid = 32\n", "'id' must be <= 31: 32 @ $.broker.id"),
        ("[broker]\nid = -1\n", "'id' must be >= 0: -1 @ $.broker.id"),
        (
            "[broker]\nport = 65530\nid = 6\n[cxl]\nmax_brokers = 8\n",
            "'port' + 'id' (the data port) must be <= 65535: 65530 + 6 @ $.broker.port",
        ),
        (
            "[network]\nmax_batch_bytes = 0\n",
            "'max_batch_bytes' must be > 0: 0 @ $.network.max_batch_bytes",
        ),
        (
            "[network]\npause_high_watermark = 1.5\n",
            "'pause_high_watermark' must be <= 1.0: 1.5 @ $.network.pause_high_watermark",
        ),
        (
            "[network]\npause_high_watermark = 0\nresume_low_watermark = 0\n",
            "'pause_high_watermark' must be > 0.0: 0.0 @ $.network.pause_high_watermark",
        ),
        (
            "[network]\nresume_low_watermark = -0.1\n",
            "'resume_low_watermark' must be >= 0.0: -0.1 @ $.network.resume_low_watermark",
        ),
        (
            "[network]\nbackoff_max_retries = -1\n",
            "'backoff_max_retries' must be >= 0: -1 @ $.network.backoff_max_retries",
        ),
        (
            "[network]\nidle_timeout_s = -1\n",
            "'idle_timeout_s' must be >= 0.0: -1.0 @ $.network.idle_timeout_s",
        ),
        (
            "[network]\nbatch_timeout_s = 0\n",
            "'batch_timeout_s' must be > 0.0: 0.0 @ $.network.batch_timeout_s",
        ),
        (
            "[network]\nbatch_timeout_s = inf\n",
            "'batch_timeout_s' must be finite: inf @ $.network.batch_timeout_s",
        ),
        (
            "[network]\nhandshake_timeout_s = nan\n",
            "'handshake_timeout_s' must be finite: nan @ $.network.handshake_timeout_s",
        ),
        ("[cxl]\npath = ''\n", "'path' must not be empty @ $.cxl.path"),
        ("[cxl]\nmax_brokers = 0\n", "'max_brokers' must be >= 1: 0 @ $.cxl.max_brokers"),
        ("[cxl]\nmax_brokers = 33\n", "'max_brokers' must be <= 32: 33 @ $.cxl.max_brokers"),
        ("[cxl]\nsize_mb = 0\n", "'size_mb' must be > 0: 0 @ $.cxl.size_mb"),
        (
            "[storage]\nsync_bytes = 0\n",
            "'sync_bytes' must be > 0: 0 @ $.storage.sync_bytes",
        ),
        (
            "[logging]\nlevel = 'TRACE'\n",
            "'level' must be in ('DEBUG', 'INFO', 'WARNING', 'ERROR', 'CRITICAL') "
            "(got 'TRACE') @ $.logging.level",
        ),
    ],
)
def test_bad_file_value(tmp_path: Path, text: str, problem: str) -> None:
    assert problems_of(tmp_path, text) == [problem]


# --- cross-field -----------------------------------------------------------------


def test_max_batch_bytes_above_staging_buffer_when_nonblocking(tmp_path: Path) -> None:
    text = "[network]\nmax_batch_bytes = 4194305\n"
    assert problems_of(tmp_path, text) == [
        "'max_batch_bytes' must be <= the staging buffer size (4194304) when "
        "use_nonblocking is true: 4194305 @ $.network.max_batch_bytes"
    ]


def test_max_batch_bytes_equal_to_staging_buffer_is_fine(tmp_path: Path) -> None:
    path = write(tmp_path, "[network]\nmax_batch_bytes = 4194304\n")
    assert load_config(path, env={}).network.effective_max_batch_bytes == 4 * MIB


def test_max_batch_bytes_above_staging_buffer_ok_on_direct_path(tmp_path: Path) -> None:
    path = write(tmp_path, "[network]\nuse_nonblocking = false\nmax_batch_bytes = 8388608\n")
    config = load_config(path, env={})
    assert config.network.effective_max_batch_bytes == 8 * MIB
    assert config.network.staging_buffer_bytes == 4 * MIB


@pytest.mark.parametrize(("low", "high"), [(0.5, 0.5), (0.9, 0.8), (1.0, 1.0)])
def test_watermark_order(tmp_path: Path, low: float, high: float) -> None:
    text = f"[network]\nresume_low_watermark = {low}\npause_high_watermark = {high}\n"
    assert problems_of(tmp_path, text) == [
        f"'resume_low_watermark' must be < 'pause_high_watermark' ({high}): {low} "
        "@ $.network.resume_low_watermark"
    ]


def test_backoff_max_below_initial(tmp_path: Path) -> None:
    text = "[network]\nbackoff_initial_us = 200\nbackoff_max_us = 199\n"
    assert problems_of(tmp_path, text) == [
        "'backoff_max_us' must be >= 'backoff_initial_us' (200): 199 @ $.network.backoff_max_us"
    ]


def test_segment_larger_than_region(tmp_path: Path) -> None:
    assert problems_of(tmp_path, "[cxl]\nsize_mb = 16\n") == [
        "'segment_mb' must be <= 'size_mb' (16): 32 @ $.cxl.segment_mb"
    ]


def test_batch_bigger_than_segment(tmp_path: Path) -> None:
    # Exactly segment - 192 fits.
    text = "[network]\nuse_nonblocking = false\nmax_batch_bytes = 33554240\n"
    assert load_config(write(tmp_path, text), env={}).network.max_batch_bytes == 32 * MIB - 192
    text = "[network]\nuse_nonblocking = false\nmax_batch_bytes = 33554241\n"
    assert problems_of(tmp_path, text) == [
        "'max_batch_bytes' must be <= the CXL segment size minus 192 header bytes "
        "(33554240): 33554241 @ $.network.max_batch_bytes"
    ]


def test_unset_batch_size_bigger_than_segment(tmp_path: Path) -> None:
    # Unset max_batch_bytes means the staging buffer: 4 MiB > 4 MiB - 192.
    assert problems_of(tmp_path, "[cxl]\nsegment_mb = 4\n") == [
        "'max_batch_bytes' (unset, so the staging buffer size) must be <= the CXL segment "
        "size minus 192 header bytes (4194112): 4194304 @ $.network.max_batch_bytes"
    ]


MAX_BROKERS_HINT = (
    " (raise cxl.max_brokers; a region made for fewer brokers must then be recreated with --reset)"
)


@pytest.mark.parametrize(("broker_id", "max_brokers"), [(4, 4), (31, 2), (1, 1)])
def test_broker_id_not_below_max_brokers(tmp_path: Path, broker_id: int, max_brokers: int) -> None:
    text = f"[broker]\nid = {broker_id}\n[cxl]\nmax_brokers = {max_brokers}\n"
    assert problems_of(tmp_path, text) == [
        f"'id' must be < cxl.max_brokers ({max_brokers}): {broker_id}{MAX_BROKERS_HINT} "
        "@ $.broker.id"
    ]


def test_topic_order_levels(tmp_path: Path) -> None:
    text = '[topics]\norder = 5\n\n[topics."orders.eu"]\norder = 0\n\n[topics.logs]\n'
    topics = load_config(write(tmp_path, text), env={}).topics
    assert (topics.settings_for("x").order, topics.settings_for("orders.eu").order) == (5, 0)
    assert topics.settings_for("logs").order == 5
    env = {"TRIO_EMBARCADERO_TOPICS__ORDER": "5"}
    assert load_config(env=env).topics.defaults.order == 5
    assert Config().topics.defaults.order == 0
    valid = "must be 0 (each broker's own order) or 5 (one total order across brokers)"
    assert problems_of(tmp_path, '[topics]\norder = 1\n[topics."a.b"]\norder = 4\n') == [
        f"'order' {valid}: 1 @ $.topics.order",
        f"'order' {valid}: 4 @ $.topics.\"a.b\".order",
    ]
    assert problems_of(tmp_path, env={"TRIO_EMBARCADERO_TOPICS__ORDER": "3"}) == [
        f"'order' {valid}: 3 @ $.topics.order (from TRIO_EMBARCADERO_TOPICS__ORDER)"
    ]
    assert problems_of(tmp_path, "[topics]\norder = true\n") == [
        "invalid value for type, expected int: True @ $.topics.order"
    ]


def test_heartbeat_and_cluster_keys(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            "[broker]\nheartbeat_interval_s = 0.5\nheartbeat_timeout_s = 1\n"
            "[cluster]\nrestart_backoff_initial_s = 0.01\nmax_start_failures = 1\n",
        ),
        env={},
    )
    assert (config.broker.heartbeat_interval_s, config.broker.heartbeat_timeout_s) == (0.5, 1.0)
    assert (config.cluster.restart_backoff_initial_s, config.cluster.max_start_failures) == (
        0.01,
        1,
    )
    assert problems_of(
        tmp_path,
        "[broker]\nheartbeat_interval_s = 1.0\nheartbeat_timeout_s = 1.5\n"
        f'host = "{"h" * 48}"\n'
        "[cluster]\nrestart_backoff_initial_s = 20.0\nmax_start_failures = 0\n",
    ) == [
        f"'host' must be at most 47 bytes (the region's broker table has room for that much "
        f"of the address others reach the broker at): '{'h' * 48}' @ $.broker.host",
        "'heartbeat_timeout_s' must be at least twice 'heartbeat_interval_s' (1.0), so one "
        "late beat is not taken for a dead broker: 1.5 @ $.broker.heartbeat_timeout_s",
        "'max_start_failures' must be > 0: 0 @ $.cluster.max_start_failures",
        "'restart_backoff_max_s' must be >= 'restart_backoff_initial_s' (20.0): 10.0 "
        "@ $.cluster.restart_backoff_max_s",
    ]


@pytest.mark.parametrize(
    ("overrides", "port"),
    [
        ({}, None),  # off by default
        ({"cluster.grpc_port": 12140}, 12140),
        ({"cluster.grpc_port": 12140, "broker.id": 1}, None),  # the head's alone
        ({"cluster.grpc_port": 12140, "broker.port": 0}, 0),  # ephemeral, as the data port
        ({"cluster.grpc_port": 1218}, 1218),  # above the data ports of 4 broker ids
        ({"cluster.grpc_port": 9215, "http.enabled": False}, 9215),
    ],
)
def test_grpc_port(overrides: dict[str, object], port: int | None) -> None:
    config = load_config(env={}, overrides=overrides)
    assert config.cluster.grpc_port_for(config.broker) == port


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        (
            {"cluster.grpc_port": 1217},
            "'grpc_port' (1217) is broker 3's data port (broker.port + id): set "
            "cluster.grpc_port to another port, e.g. 12140 @ $.cluster.grpc_port",
        ),
        (
            {"cluster.grpc_port": 9214, "broker.id": 1},
            "'grpc_port' (9214) is broker 0's HTTP port (http.port + id): set "
            "cluster.grpc_port to another port, e.g. 12140 @ $.cluster.grpc_port",
        ),
        ({"cluster.grpc_port": 65536}, "'grpc_port' must be <= 65535: 65536 @ $.cluster.grpc_port"),
    ],
)
def test_grpc_port_collisions(overrides: dict[str, object], problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(env={}, overrides=overrides)
    assert [p.removesuffix(" (from override)") for p in info.value.problems] == [problem]


def test_the_sequencer_lease(tmp_path: Path) -> None:
    assert load_config(None, env={}).cxl.sequencer_lease_s == 1.0
    config = load_config(
        write(tmp_path, "[cxl]\nsequencer_lease_s = 0.02\nsequencer_interval_ms = 5\n"), env={}
    )
    assert config.cxl.sequencer_lease_s == 0.02
    assert problems_of(tmp_path, "[cxl]\nsequencer_lease_s = 0.019\n") == [
        "'sequencer_lease_s' must be at least four 'sequencer_interval_ms' (5.0 ms), so the "
        "sequencer renews its lease several times before it expires: 0.019 "
        "@ $.cxl.sequencer_lease_s"
    ]
    assert problems_of(tmp_path, "[cxl]\nsequencer_lease_s = 0\n") == [
        "'sequencer_lease_s' must be > 0.0: 0.0 @ $.cxl.sequencer_lease_s"
    ]
    env = {"TRIO_EMBARCADERO_CXL__SEQUENCER_LEASE_S": "2.5"}
    assert load_config(None, env=env).cxl.sequencer_lease_s == 2.5


def test_broker_id_just_below_max_brokers(tmp_path: Path) -> None:
    path = write(tmp_path, "[broker]\nid = 31\n[cxl]\nmax_brokers = 32\n")
    assert load_config(path, env={}).broker.id == 31


def test_cross_field_checks_run_beside_unrelated_errors(tmp_path: Path) -> None:
    # A bad backoff value doesn't stop the watermark check, nor does a bad
    # logging level stop the broker-id check.
    text = (
        "[network]\nbackoff_max_retries = -1\nresume_low_watermark = 0.9\n"
        "[broker]\nid = 4\n[logging]\nlevel = 'x'\n"
    )
    assert problems_of(tmp_path, text) == [
        "'backoff_max_retries' must be >= 0: -1 @ $.network.backoff_max_retries",
        "'resume_low_watermark' must be < 'pause_high_watermark' (0.875): 0.9 "
        "@ $.network.resume_low_watermark",
        "'level' must be in ('DEBUG', 'INFO', 'WARNING', 'ERROR', 'CRITICAL') "
        "(got 'X') @ $.logging.level",
        f"'id' must be < cxl.max_brokers (4): 4{MAX_BROKERS_HINT} @ $.broker.id",
    ]


def test_cross_field_check_skipped_when_an_input_is_invalid(tmp_path: Path) -> None:
    # The watermark order can't be judged when one of them is a string.
    text = "[network]\nresume_low_watermark = 'high'\npause_high_watermark = 0.1\n"
    assert problems_of(tmp_path, text) == [
        "invalid value for type, expected float: 'high' @ $.network.resume_low_watermark"
    ]


def test_direct_construction_is_validated() -> None:
    with pytest.raises(ValueError, match=r"^'staging_pool_num_buffers' must be > 0: 0$"):
        NetworkConfig(staging_pool_num_buffers=0)
    with pytest.raises(TypeError, match="'port' must be <class 'int'>"):
        BrokerConfig(port="80")  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=r"^'resume_low_watermark' must be < 'pause_high_watermark' \(0.5\): 0.5$"
    ):
        NetworkConfig(pause_high_watermark=0.5)
    with pytest.raises(ValueError, match=r"^'segment_mb' must be <= 'size_mb' \(8\): 32$"):
        CxlConfig(size_mb=8)
    with pytest.raises(ValueError, match=r"^'id' must be < cxl.max_brokers \(4\): 5 \(raise "):
        Config(broker=BrokerConfig(id=5))
    with pytest.raises(ValueError, match=r"'backoff_max_us' must be >= 'backoff_initial_us'"):
        attrs.evolve(NetworkConfig(), backoff_initial_us=5000)


# --- topics ------------------------------------------------------------------------


def test_topics_defaults_from_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[topics]\nretention_bytes = 1000\nretention_ms = 60000\n")
    topics = load_config(path, env={}).topics
    assert topics == TopicsConfig(defaults=TopicSettings(retention_bytes=1000, retention_ms=60000))
    assert topics.overrides == {}
    assert topics.settings_for("anything") == TopicSettings(
        retention_bytes=1000, retention_ms=60000
    )


TOPICS_FILE = """
[topics]
retention_bytes = 1000

[topics."orders.eu"]
retention_ms = 5000

[topics.logs]
retention_bytes = 10
retention_ms = 20

[topics.free]
retention_bytes = -1

[topics.empty]
"""


def test_topic_overrides_set_only_their_keys(tmp_path: Path) -> None:
    topics = load_config(write(tmp_path, TOPICS_FILE), env={}).topics
    assert topics.defaults == TopicSettings(retention_bytes=1000)
    assert topics.overrides == {
        "orders.eu": TopicOverride(retention_ms=5000),
        "logs": TopicOverride(retention_bytes=10, retention_ms=20),
        "free": TopicOverride(retention_bytes=-1),
        "empty": TopicOverride(),
    }
    assert topics.settings_for("orders.eu") == TopicSettings(
        retention_bytes=1000, retention_ms=5000
    )
    assert topics.settings_for("logs") == TopicSettings(retention_bytes=10, retention_ms=20)
    # -1 in an override lifts a default limit.
    assert topics.settings_for("free") == TopicSettings(retention_bytes=-1, retention_ms=-1)
    assert topics.settings_for("empty") == topics.defaults
    # Names are exact: no prefix or case matching, and "orders" is not "orders.eu".
    for other in ("orders", "orders.EU", "Logs", "logs.x", ""):
        assert topics.settings_for(other) == topics.defaults, other


def test_topic_override_without_topics_keys_takes_the_builtin_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "[topics.audit]\nretention_ms = 1\n")
    topics = load_config(path, env={}).topics
    assert topics.defaults == TopicSettings()
    assert topics.settings_for("audit") == TopicSettings(retention_bytes=-1, retention_ms=1)


@pytest.mark.parametrize("name", ["orders.eu", "a.b.c", ".", "..", "x" * 31, "A-b_c.9", "_"])
def test_quoted_topic_names(tmp_path: Path, name: str) -> None:
    path = write(tmp_path, f'[topics."{name}"]\nretention_bytes = 7\n')
    topics = load_config(path, env={}).topics
    assert list(topics.overrides) == [name]
    assert topics.settings_for(name) == TopicSettings(retention_bytes=7)


def test_topic_tables_in_other_toml_spellings(tmp_path: Path) -> None:
    # A dotted key and an inline table are the same TOML tables.
    text = '[topics]\n"a.b".retention_ms = 3\nc = { retention_bytes = 4 }\n'
    topics = load_config(write(tmp_path, text), env={}).topics
    assert topics.overrides == {
        "a.b": TopicOverride(retention_ms=3),
        "c": TopicOverride(retention_bytes=4),
    }


def test_unquoted_dotted_topic_name_says_to_quote_it(tmp_path: Path) -> None:
    # [topics.orders.eu] is a table "eu" inside a topic table "orders".
    assert problems_of(tmp_path, "[topics.orders.eu]\nretention_ms = 5\n") == [
        "a topic's table holds no tables (eu): quote a topic name that has a dot, "
        '[topics."orders.eu"] @ $.topics.orders'
    ]
    # The table's own keys are still judged.
    text = "[topics.a]\nretention_ms = 0\n[topics.a.b.c]\n"
    assert problems_of(tmp_path, text) == [
        'a topic\'s table holds no tables (b): quote a topic name that has a dot, [topics."a.b"] '
        "@ $.topics.a",
        "'retention_ms' must be -1 (no limit) or > 0: 0 @ $.topics.a.retention_ms",
    ]


@pytest.mark.parametrize(
    ("table", "path", "problem"),
    [
        ('"bad name"', '"bad name"', "invalid topic name 'bad name': want 1-31 of [A-Za-z0-9._-]"),
        ('""', '""', "invalid topic name '': want 1-31 of [A-Za-z0-9._-]"),
        ("x" * 32, "x" * 32, f"invalid topic name '{'x' * 32}': want 1-31 of [A-Za-z0-9._-]"),
        ('"é"', '"é"', "invalid topic name 'é': want 1-31 of [A-Za-z0-9._-]"),
        ('"a/b"', '"a/b"', "invalid topic name 'a/b': want 1-31 of [A-Za-z0-9._-]"),
        (
            "retention_ms",
            "retention_ms",
            "topic 'retention_ms' is named like a [topics] key: it can't have a table",
        ),
    ],
)
def test_invalid_topic_names(tmp_path: Path, table: str, path: str, problem: str) -> None:
    # The table's keys are judged beside its name.
    assert problems_of(tmp_path, f"[topics.{table}]\nretention_bytes = 0\nx = 1\n") == [
        f"{problem} @ $.topics.{path}",
        f"'retention_bytes' must be -1 (no limit) or > 0: 0 @ $.topics.{path}.retention_bytes",
        f"extra fields found (x) @ $.topics.{path}",
    ]


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("0", "'{key}' must be -1 (no limit) or > 0: 0"),
        ("-2", "'{key}' must be -1 (no limit) or > 0: -2"),
        ("-9223372036854775808", "'{key}' must be -1 (no limit) or > 0: -9223372036854775808"),
        ("'100'", "invalid value for type, expected int: '100'"),
        ("1.5", "invalid value for type, expected int: 1.5"),
        ("100.0", "invalid value for type, expected int: 100.0"),
        ("-1.0", "invalid value for type, expected int: -1.0"),
        ("true", "invalid value for type, expected int: True"),
        ("[1]", "invalid value for type, expected int: [1]"),
    ],
)
@pytest.mark.parametrize("key", ["retention_bytes", "retention_ms"])
def test_bad_retention_values(tmp_path: Path, key: str, value: str, problem: str) -> None:
    message = problem.format(key=key)
    text = f'[topics]\n{key} = {value}\n[topics."orders.eu"]\n{key} = {value}\n'
    assert problems_of(tmp_path, text) == [
        f"{message} @ $.topics.{key}",
        f'{message} @ $.topics."orders.eu".{key}',
    ]


def test_retention_limits_accept_minus_one_and_any_positive(tmp_path: Path) -> None:
    for value in (-1, 1, 2**63 - 1):
        text = f"[topics]\nretention_bytes = {value}\nretention_ms = {value}\n"
        settings = load_config(write(tmp_path, text), env={}).topics.defaults
        assert settings == TopicSettings(retention_bytes=value, retention_ms=value)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[topics]\nretention = 5\n", "extra fields found (retention) @ $.topics"),
        ("[topics]\nretention_ms = 5\norders = 5\n", "extra fields found (orders) @ $.topics"),
        ("[topics.t]\nretention = 5\n", "extra fields found (retention) @ $.topics.t"),
        (
            '[topics."a.b"]\nretention_s = 5\nsequencer = 1\n',
            'extra fields found (retention_s, sequencer) @ $.topics."a.b"',
        ),
        ("topics = 5\n", "expected a table, got int: 5 @ $.topics"),
        ("topics = [1]\n", "expected a table, got list: [1] @ $.topics"),
        ('[topics]\n"a.b" = 5\n', "extra fields found (a.b) @ $.topics"),
    ],
)
def test_unknown_topics_keys(tmp_path: Path, text: str, problem: str) -> None:
    assert problems_of(tmp_path, text) == [problem]


def test_topics_problems_all_at_once(tmp_path: Path) -> None:
    text = """
[broker]
port = -1

[topics]
retention_bytes = 0
retention_ms = "1d"
bogus = 1

[topics."orders.eu"]
retention_ms = -5
extra = 1

[topics."bad name"]
retention_bytes = 5

[topics.fine]
retention_bytes = 5
"""
    env = {"TRIO_EMBARCADERO_TOPICS__NOPE": "1"}
    assert problems_of(tmp_path, text, env=env) == [
        "unknown environment variable (expected TRIO_EMBARCADERO_<SECTION>__<KEY> "
        "naming a config key) @ $env.TRIO_EMBARCADERO_TOPICS__NOPE",
        "'port' must be >= 0: -1 @ $.broker.port",
        "'retention_bytes' must be -1 (no limit) or > 0: 0 @ $.topics.retention_bytes",
        "invalid value for type, expected int: '1d' @ $.topics.retention_ms",
        "'retention_ms' must be -1 (no limit) or > 0: -5 @ $.topics.\"orders.eu\".retention_ms",
        'extra fields found (extra) @ $.topics."orders.eu"',
        "invalid topic name 'bad name': want 1-31 of [A-Za-z0-9._-] @ $.topics.\"bad name\"",
        "extra fields found (bogus) @ $.topics",
    ]


def test_topics_defaults_from_the_environment_under_file_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, TOPICS_FILE)
    env = {
        "TRIO_EMBARCADERO_TOPICS__RETENTION_BYTES": "2000",
        "TRIO_EMBARCADERO_TOPICS__RETENTION_MS": "+60000",
    }
    topics = load_config(path, env=env).topics
    # The environment beats the file's default...
    assert topics.defaults == TopicSettings(retention_bytes=2000, retention_ms=60000)
    # ...an override's own keys beat both, and its other keys follow the default.
    assert topics.settings_for("orders.eu") == TopicSettings(
        retention_bytes=2000, retention_ms=5000
    )
    assert topics.settings_for("logs") == TopicSettings(retention_bytes=10, retention_ms=20)
    assert topics.settings_for("empty") == topics.defaults
    # Overrides (the command line's layer) set the defaults too.
    topics = load_config(path, env=env, overrides={"topics.retention_ms": -1}).topics
    assert topics.defaults == TopicSettings(retention_bytes=2000, retention_ms=-1)


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ("0", "'retention_bytes' must be -1 (no limit) or > 0: 0"),
        ("-2", "'retention_bytes' must be -1 (no limit) or > 0: -2"),
        ("1.5", "invalid value for type, expected int: '1.5'"),
        ("1GB", "invalid value for type, expected int: '1GB'"),
        ("", "invalid value for type, expected int: ''"),
    ],
)
def test_env_bad_topics_default(raw: str, problem: str) -> None:
    var = "TRIO_EMBARCADERO_TOPICS__RETENTION_BYTES"
    assert problems_of(Path(), env={var: raw}) == [
        f"{problem} @ $.topics.retention_bytes (from {var})"
    ]


def test_topic_overrides_only_from_the_file() -> None:
    var = "TRIO_EMBARCADERO_TOPICS__ORDERS__RETENTION_MS"
    assert problems_of(Path(), env={var: "5"}) == [
        "unknown environment variable (expected TRIO_EMBARCADERO_<SECTION>__<KEY> "
        f"naming a config key) @ $env.{var}"
    ]
    assert problems_of(Path(), overrides={"topics.orders.retention_ms": 5}) == [
        "unknown key @ $.topics.orders.retention_ms (from override)"
    ]


def test_topics_round_trip_through_check_config_text(tmp_path: Path) -> None:
    config = load_config(
        write(tmp_path, TOPICS_FILE), env={"TRIO_EMBARCADERO_TOPICS__RETENTION_MS": "7"}
    )
    text = config_to_toml(config)
    assert text.endswith(
        "\n[topics]\nretention_bytes = 1000\nretention_ms = 7\norder = 0\n\n"
        '[topics."orders.eu"]\nretention_ms = 5000\n\n'
        "[topics.logs]\nretention_bytes = 10\nretention_ms = 20\n\n"
        "[topics.free]\nretention_bytes = -1\n\n"
        "[topics.empty]\n"
    )
    again = load_config(write(tmp_path, text, "again.toml"), env={})
    assert again == config
    # An override keeps only the keys it set: the default still shows through.
    assert again.topics.overrides["orders.eu"] == TopicOverride(retention_ms=5000)


def test_settings_for() -> None:
    topics = TopicsConfig(
        defaults=TopicSettings(retention_bytes=100, retention_ms=200),
        overrides={
            "a": TopicOverride(retention_ms=1),
            "b": TopicOverride(retention_bytes=2),
            "c": TopicOverride(retention_bytes=3, retention_ms=4),
            "d": TopicOverride(),
        },
    )
    assert topics.settings_for("a") == TopicSettings(retention_bytes=100, retention_ms=1)
    assert topics.settings_for("b") == TopicSettings(retention_bytes=2, retention_ms=200)
    assert topics.settings_for("c") == TopicSettings(retention_bytes=3, retention_ms=4)
    assert topics.settings_for("d") == topics.defaults
    assert topics.settings_for("e") is topics.defaults
    assert TopicsConfig().settings_for("a") == TopicSettings(retention_bytes=-1, retention_ms=-1)


def test_topic_override_mirrors_topic_settings() -> None:
    # An override has one optional field per setting, so a key added to one
    # and not the other fails here.
    settings = attrs.fields(TopicSettings)
    override = attrs.fields(TopicOverride)
    assert [f.name for f in override] == [f.name for f in settings]
    assert all(f.default is None for f in override)
    for field, bad, message in [
        ("retention_bytes", 0, r"^'retention_bytes' must be -1 \(no limit\) or > 0: 0$"),
        ("retention_ms", 0, r"^'retention_ms' must be -1 \(no limit\) or > 0: 0$"),
        ("order", 1, r"^'order' must be 0 \(each broker's own order\) or 5 .*: 1$"),
    ]:
        with pytest.raises(ValueError, match=message):
            TopicSettings(**{field: bad})
        with pytest.raises(ValueError, match=message):
            TopicOverride(**{field: bad})
    assert {f.name for f in settings} == {"retention_bytes", "retention_ms", "order"}


def test_topics_direct_construction_is_validated() -> None:
    with pytest.raises(ValueError, match=r"invalid topic name 'bad name'"):
        TopicsConfig(overrides={"bad name": TopicOverride()})
    with pytest.raises(ValueError, match=r"topic 'retention_bytes' is named like a \[topics\] key"):
        TopicsConfig(overrides={"retention_bytes": TopicOverride()})
    with pytest.raises(TypeError):
        TopicsConfig(overrides={"a": TopicSettings()})  # type: ignore[dict-item]
    with pytest.raises(TypeError):
        TopicSettings(retention_ms=1.0)  # type: ignore[arg-type]


def test_topics_config_is_immutable_picklable_and_hashable() -> None:
    source = {"a.b": TopicOverride(retention_ms=3)}
    config = Config(topics=TopicsConfig(overrides=source))
    source["c"] = TopicOverride()
    assert list(config.topics.overrides) == ["a.b"], "the config keeps its own copy"
    with pytest.raises(TypeError):
        config.topics.overrides["c"] = TopicOverride()  # type: ignore[index]
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        config.topics.defaults = TopicSettings()  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(config)) == config
    assert copy.deepcopy(config) == config
    assert hash(copy.deepcopy(config)) == hash(config)
    assert config != Config()
    assert repr(config.topics.overrides) == repr({"a.b": TopicOverride(retention_ms=3)})


# --- many problems at once ---------------------------------------------------------


def test_many_problems_in_one_error(tmp_path: Path) -> None:
    text = """
[broker]
id = 32
port = -1

[network]
staging_pool_num_buffers = 0
staging_pool_buffer_size_mb = 2.5
max_batch_bytes = true
use_nonblocking = 1
pause_high_watermark = 0.5
resume_low_watermark = 0.6

[cxl]
bogus = 1
max_topics = "many"

[logging]
level = "loud"

[extra]
x = 1
"""
    env = {
        "TRIO_EMBARCADERO_X": "1",
        "EMBARCADERO_NUM_CXL_ALLOCATION_WORKERS": "2.5",
        "TRIO_EMBARCADERO_STORAGE__SYNC_BYTES": "0",
    }
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), env=env, overrides={"broker.hots": "x"})
    assert info.value.problems == [
        "unknown environment variable (expected TRIO_EMBARCADERO_<SECTION>__<KEY> "
        "naming a config key) @ $env.TRIO_EMBARCADERO_X",
        "invalid value for type, expected int: '2.5' @ $.network.num_cxl_allocation_workers "
        "(from EMBARCADERO_NUM_CXL_ALLOCATION_WORKERS)",
        "unknown key @ $.broker.hots (from override)",
        "'id' must be <= 31: 32 @ $.broker.id",
        "'port' must be >= 0: -1 @ $.broker.port",
        "invalid value for type, expected bool: 1 @ $.network.use_nonblocking",
        "invalid value for type, expected int: 2.5 @ $.network.staging_pool_buffer_size_mb",
        "'staging_pool_num_buffers' must be > 0: 0 @ $.network.staging_pool_num_buffers",
        "invalid value for type, expected int: True @ $.network.max_batch_bytes",
        "'resume_low_watermark' must be < 'pause_high_watermark' (0.5): 0.6 "
        "@ $.network.resume_low_watermark",
        "invalid value for type, expected int: 'many' @ $.cxl.max_topics",
        "extra fields found (bogus) @ $.cxl",
        "'sync_bytes' must be > 0: 0 @ $.storage.sync_bytes "
        "(from TRIO_EMBARCADERO_STORAGE__SYNC_BYTES)",
        "'level' must be in ('DEBUG', 'INFO', 'WARNING', 'ERROR', 'CRITICAL') "
        "(got 'LOUD') @ $.logging.level",
        "extra fields found (extra) @ $",
    ]
    message = str(info.value)
    assert message.startswith("invalid configuration:\n  - unknown environment variable")
    assert message.count("\n  - ") == 15


# --- file errors -------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert info.value.problems == [
        f"cannot read config file {str(path)!r}: No such file or directory @ $"
    ]
    assert isinstance(info.value.__cause__, FileNotFoundError)


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path, env={})
    assert info.value.problems == [f"cannot read config file {str(tmp_path)!r}: Is a directory @ $"]


def test_unreadable_file_still_reports_environment_problems(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(
            path,
            env={"TRIO_EMBARCADERO_NOPE": "1", "TRIO_EMBARCADERO_CXL__SIZE_MB": "0"},
            overrides={"x.y": 1},
        )
    # The value 0 isn't judged without the file, but unknown names are.
    assert info.value.problems == [
        f"cannot read config file {str(path)!r}: No such file or directory @ $",
        "unknown environment variable (expected TRIO_EMBARCADERO_<SECTION>__<KEY> "
        "naming a config key) @ $env.TRIO_EMBARCADERO_NOPE",
        "unknown key @ $.x.y (from override)",
    ]


def test_toml_syntax_error(tmp_path: Path) -> None:
    path = write(tmp_path, "[network]\nstaging_pool_num_buffers = \n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert info.value.problems == [
        f"invalid TOML in config file {str(path)!r}: Invalid value (at line 2, column 28) @ $"
    ]


def test_toml_duplicate_key(tmp_path: Path) -> None:
    path = tmp_path / "broker.toml"
    problems = problems_of(tmp_path, "[broker]\nport = 1\nport = 2\n")
    assert len(problems) == 1
    assert problems[0].startswith(f"invalid TOML in config file {str(path)!r}: ")
    assert "(at line 3, column" in problems[0]


def test_file_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b"[cxl]\npath = '\xe9'\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith(f"config file {str(path)!r} is not UTF-8: ")
    assert info.value.problems[0].endswith(" @ $")


# --- rendering -----------------------------------------------------------------------


def test_config_to_toml_defaults_text() -> None:
    text = config_to_toml(Config())
    assert text.startswith(
        '[broker]\nid = 0\nhost = "127.0.0.1"\nport = 1214\nheartbeat_interval_s = 0.2\n'
        "heartbeat_timeout_s = 2.0\n\n[cluster]\nrestart_backoff_initial_s = 0.1\n"
        "restart_backoff_max_s = 10.0\nmax_start_failures = 5\ngrpc_port = 0\n\n[network]\n"
    )
    assert "\n# max_batch_bytes is unset: the staging buffer size (4194304 bytes)\n" in text
    assert "\nmax_batch_bytes" not in text
    # The comment sits inside the table it is about.
    network = text.split("\n[network]\n")[1].split("\n[cxl]\n")[0]
    assert "# max_batch_bytes is unset" in network
    assert "\npause_high_watermark = 0.875\n" in text
    assert "\nidle_timeout_s = 0.0\n" in text
    assert "\nprefault = true\n" in text
    # File modes read as what they are: octal.
    assert text.count("\nmode = 0o600\n") == 2
    assert '\n\n[http]\nenabled = true\nhost = "127.0.0.1"\nport = 9214\n' in text
    assert '\n\n[logging]\nlevel = "INFO"\nformat = "text"\n' in text
    assert text.endswith("\n\n[topics]\nretention_bytes = -1\nretention_ms = -1\norder = 0\n")
    sections = [line for line in text.splitlines() if line.startswith("[")]
    assert sections == [
        "[broker]",
        "[cluster]",
        "[network]",
        "[cxl]",
        "[storage]",
        "[http]",
        "[logging]",
        "[topics]",
    ]
    keys = [line.split(" = ")[0] for line in text.splitlines() if " = " in line]
    assert len(keys) == 5 + 4 + 27 + 16 + 5 + 3 + 2 + 3


@pytest.mark.parametrize(
    "config",
    [
        Config(),
        Config(
            broker=BrokerConfig(id=3, host="::", port=0),
            network=NetworkConfig(
                use_nonblocking=False,
                max_batch_bytes=9_000_000,
                pause_high_watermark=0.1 + 0.2,
                resume_low_watermark=1e-7,
                idle_timeout_s=1e15,
                stats_interval_s=1.0 / 3.0,
            ),
            cxl=CxlConfig(
                path='/tmp/we"ird\\path\n\t\x7fé✓',
                max_brokers=8,
                prefault=False,
                mode=0o640,
                allow_weak_memory_ordering=True,
            ),
            storage=StorageConfig(dir="/var/x", sync_interval_ms=0.001, sync_bytes=1, mode=0o777),
            logging=LoggingConfig(level="critical"),
            topics=TopicsConfig(
                defaults=TopicSettings(retention_bytes=1, retention_ms=2**62),
                overrides={
                    "orders.eu": TopicOverride(retention_ms=1),
                    "a.b.c": TopicOverride(retention_bytes=2**40, retention_ms=-1),
                    "Plain-name_9": TopicOverride(retention_bytes=-1),
                    "empty": TopicOverride(),
                    "." * 31: TopicOverride(retention_bytes=5),
                },
            ),
        ),
    ],
)
def test_config_to_toml_round_trip(tmp_path: Path, config: Config) -> None:
    text = config_to_toml(config)
    path = write(tmp_path, text)
    assert load_config(path, env={}) == config
    assert ("# max_batch_bytes is unset" in text) == (config.network.max_batch_bytes is None)
    # Every override is printed as its own table, with only the keys it sets.
    tables = tomllib.loads(text)["topics"]
    for name, override in config.topics.overrides.items():
        assert tables[name] == {k: v for k, v in attrs.asdict(override).items() if v is not None}


def test_round_trip_of_loaded_file(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FULL_FILE), env={})
    again = load_config(write(tmp_path, config_to_toml(config), "again.toml"), env={})
    assert again == config


# --- immutability ----------------------------------------------------------------------


def test_frozen() -> None:
    config = Config()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        config.broker = BrokerConfig(port=1)  # type: ignore[misc]
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        config.network.staging_pool_num_buffers = 1  # type: ignore[misc]
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        config.logging.level = "DEBUG"  # type: ignore[misc]
    assert config.network.staging_pool_num_buffers == 32


def test_keyword_only() -> None:
    with pytest.raises(TypeError):
        BrokerConfig(1)  # type: ignore[call-arg]


def test_load_config_does_not_touch_os_environ_when_env_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TRIO_EMBARCADERO_BROKER__PORT", "bad")
    assert load_config(env={}).broker.port == 1214
    assert os.environ["TRIO_EMBARCADERO_BROKER__PORT"] == "bad"


# --- the shipped config.toml ------------------------------------------------------

SHIPPED = Path(__file__).resolve().parent.parent / "config.toml"
# A key the file documents but leaves at its default: "# key = value  # why".
_COMMENTED_KEY = re.compile(r"#\s*([a-z_][a-z0-9_]*)\s*=\s")
# A table header, or one shown commented out: '[cxl]', '# [topics."orders.eu"]'.
_TABLE = re.compile(r"(#\s*)?\[([a-z_]+)(\..+)?\]")
# The name of a [topics.<name>] table, whichever topic the example names.
OVERRIDE_TABLE = "topics.<name>"


def documented_keys(text: str) -> dict[str, set[str]]:
    """Every key of ``text`` per table: those set and those shown commented out.

    Sub-tables of ``[topics]`` (per-topic overrides, shown commented out) are
    all filed under :data:`OVERRIDE_TABLE`.
    """
    keys: dict[str, set[str]] = {
        t: {k for k, v in table.items() if not isinstance(v, dict)}
        for t, table in tomllib.loads(text).items()
    }
    table = None
    for line in text.splitlines():
        if match := _TABLE.fullmatch(line.strip()):
            table = match.group(2) if match.group(3) is None else f"{match.group(2)}.<name>"
            keys.setdefault(table, set())
        elif table is not None and (match := _COMMENTED_KEY.match(line.strip())):
            keys[table].add(match.group(1))
    return keys


def config_schema() -> dict[str, set[str]]:
    """Every key of the config per table, [topics] and its override tables included."""
    schema = {
        section.name: {field.name for field in attrs.fields(section.type)}
        for section in attrs.fields(Config)
    }
    schema["topics"] = {field.name for field in attrs.fields(TopicSettings)}
    schema[OVERRIDE_TABLE] = {field.name for field in attrs.fields(TopicOverride)}
    return schema


def test_config_toml_documents_every_key_and_nothing_else() -> None:
    schema = config_schema()
    documented = documented_keys(SHIPPED.read_text(encoding="utf-8"))
    missing = {t: sorted(k - documented.get(t, set())) for t, k in schema.items()}
    unknown = {t: sorted(k - schema.get(t, set())) for t, k in documented.items()}
    assert {t: k for t, k in missing.items() if k} == {}, "keys config.toml does not document"
    assert {t: k for t, k in unknown.items() if k} == {}, "keys config.toml has but no config does"


def test_documented_keys_reads_commented_tables() -> None:
    # The example override's keys belong to it, not to [topics] above it.
    text = '[topics]\nretention_ms = -1\n# [topics."a.b"]\n# retention_bytes = 5\n'
    assert documented_keys(text) == {
        "topics": {"retention_ms"},
        OVERRIDE_TABLE: {"retention_bytes"},
    }
    # Without an example table, its keys count as undocumented.
    assert OVERRIDE_TABLE not in documented_keys("[topics]\nretention_ms = -1\n")


def test_config_toml_loads_and_its_commented_keys_are_valid(tmp_path: Path) -> None:
    text = SHIPPED.read_text(encoding="utf-8")
    assert load_config(SHIPPED, env={}) == Config()
    # Uncommenting every documented key and table still gives a valid config.
    uncommented = re.sub(r"(?m)^#\s*(?=[a-z_][a-z0-9_]*\s*=\s|\[)", "", text)
    config = load_config(write(tmp_path, uncommented), env={})
    assert config.network.max_batch_bytes is not None
    assert config.topics.overrides, "config.toml shows an example [topics.<name>] table"
