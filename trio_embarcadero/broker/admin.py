"""The broker's HTTP endpoint: Prometheus metrics and the admin API.

=======  ======================  ===================================================
method   path                    answer
=======  ======================  ===================================================
GET      ``/metrics``            Prometheus text format (:mod:`.metrics`)
GET      ``/healthz``            200 ``{"status": "serving"}``; 503 while draining
GET      ``/v1/stats``           the statistics snapshot as JSON
GET      ``/v1/topics``          the region and every topic, per broker stream
GET      ``/v1/topics/{name}``   one topic (404 if there is none)
POST     ``/v1/topics``          create a topic: ``{"name", "order", "retention_bytes",
                                 "retention_ms"}`` (201; 409 if it exists)
DELETE   ``/v1/topics/{name}``   delete a topic (409 while publishers are attached)
=======  ======================  ===================================================

Errors are JSON too: ``{"error": <reason phrase>, "message": <what to do>}``.
Topics are created and deleted by the log core's functions (the same the
``create-topic`` and ``delete-topic`` commands use, on a worker thread:
they take the region's file lock), so a running broker, other brokers of
the region and the commands all see one topic table.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

import trio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from ..config import ORDER_LEVELS, Config, TopicOverride, TopicSettings
from ..errors import LogFullError, TopicBusyError, TopicExistsError
from ..log import CxlLog, DiskLog
from ..log.disk import stream_files
from ..log.reader import (
    describe_brokers,
    describe_region,
    describe_streams,
    read_topic_infos,
    region_brokers,
)
from ..log.settings import RETENTION_KEYS, TopicSettingsFile
from ..log.topics import create_topic_file, delete_topic_file
from ..wire import encode_topic
from .http import Request, Response
from .metrics import BrokerCollector
from .statistics import BrokerStatistics

logger = logging.getLogger(__name__)

_TOPIC_FIELDS = frozenset({"name", "order", *RETENTION_KEYS})

#: A route's handler: the request, and the topic name of ``/v1/topics/{name}``.
_Route = Callable[[Request, str], Awaitable[Response]]


class Administered(Protocol):
    """What the endpoint reads from and does to a broker."""

    config: Config
    broker_id: int
    log: CxlLog
    shutting_down: bool
    topic_settings: TopicSettingsFile

    @property
    def disk(self) -> DiskLog | None: ...

    def statistics(self) -> BrokerStatistics: ...

    def committed_bytes(self) -> dict[tuple[str, int], int]: ...

    def settings_for(self, topic: str) -> TopicSettings: ...


class AdminApi:
    """The endpoint's request handler (an :data:`~.http.Handler`).

    Args:
        broker: The broker it serves.
    """

    def __init__(self, broker: Administered) -> None:
        self._broker = broker
        # A registry of its own: brokers embedded side by side (tests) do not
        # share prometheus_client's global one.
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(BrokerCollector(broker))
        self._routes: dict[str, dict[str, _Route]] = {
            "/metrics": {"GET": self._metrics},
            "/healthz": {"GET": self._health},
            "/v1/stats": {"GET": self._stats},
            "/v1/topics": {"GET": self._topics, "POST": self._create},
        }

    async def __call__(self, request: Request) -> Response:
        """Answer one request."""
        path = request.path.rstrip("/") or "/"
        name = ""
        if path.startswith("/v1/topics/"):
            name = path.removeprefix("/v1/topics/")
            methods: dict[str, _Route] = {"GET": self._topic, "DELETE": self._delete}
        else:
            found = self._routes.get(path)
            if found is None:
                return Response.error(404, f"no such endpoint: {request.path}")
            methods = found
        handler = methods.get("GET" if request.method == "HEAD" else request.method)
        if handler is None:
            allowed = ", ".join(sorted(methods))
            return Response.error(
                405, f"{request.method} is not allowed on {request.path}", allow=allowed
            )
        return await handler(request, name)

    # -- reading -------------------------------------------------------------------

    async def _metrics(self, _: Request, __: str) -> Response:
        await trio.lowlevel.checkpoint()
        return Response(200, generate_latest(self.registry), CONTENT_TYPE_LATEST)

    async def _health(self, _: Request, __: str) -> Response:
        await trio.lowlevel.checkpoint()
        if self._broker.shutting_down:
            return Response.json(503, {"status": "draining"})
        return Response.json(200, {"status": "serving"})

    async def _stats(self, _: Request, __: str) -> Response:
        await trio.lowlevel.checkpoint()
        return Response.json(200, self._broker.statistics().to_json())

    async def _topics(self, _: Request, __: str) -> Response:
        return Response.json(200, await self.topics_report())

    async def _topic(self, _: Request, name: str) -> Response:
        report = await self.topics_report()
        for topic in report["topics"]:
            if topic["name"] == name:
                return Response.json(200, topic)
        return Response.error(404, f"no topic {name!r}")

    async def topics_report(self) -> dict[str, Any]:
        """The region and every topic in it, per broker stream (``GET /v1/topics``)."""
        broker = self._broker
        log = broker.log
        storage_dir = broker.config.storage.dir
        on_disk = None
        if storage_dir:
            on_disk = await trio.to_thread.run_sync(_disk_files, storage_dir)
        infos = sorted(read_topic_infos(log.region, log.geometry), key=lambda t: t.name)
        members = await trio.to_thread.run_sync(
            region_brokers, log.region, log.path, log.geometry.max_brokers
        )
        return {
            "broker": broker.broker_id,
            "region": describe_region(log.path, log.geometry, log.statistics().segments_used),
            "brokers": describe_brokers(members),
            "storage_dir": storage_dir or None,
            "topics": [
                self._describe(t.name, t.order, describe_streams(t, on_disk)) for t in infos
            ],
        }

    def _describe(self, name: str, order: int, streams: list[dict[str, Any]]) -> dict[str, Any]:
        broker = self._broker
        record = broker.topic_settings.get(name)
        settings = broker.settings_for(name)
        override = broker.config.topics.overrides.get(name)
        source = {}
        for key in RETENTION_KEYS:
            if record is not None and getattr(record, key) is not None:
                source[key] = "api"
            elif override is not None and getattr(override, key) is not None:
                source[key] = "config"
            else:
                source[key] = "default"
        return {
            "name": name,
            "order": order,
            "retention_bytes": settings.retention_bytes,
            "retention_ms": settings.retention_ms,
            "retention_source": source,
            "messages": sum(s["messages"] for s in streams),
            "bytes": sum(s["bytes"] for s in streams),
            "streams": streams,
        }

    # -- changing ------------------------------------------------------------------

    async def _create(self, request: Request, _: str) -> Response:
        broker = self._broker
        if broker.shutting_down:
            return Response.error(503, "the broker is draining for a shutdown")
        try:
            name, asked, retention = _topic_to_create(request.body)
        except ValueError as exc:
            return Response.error(400, str(exc))
        try:
            order = await create_topic(broker, name, asked, retention, via="HTTP")
        except TopicExistsError as exc:
            return Response.error(409, f"{exc}; delete it first to create it anew")
        except LogFullError as exc:
            return Response.error(507, str(exc))
        return Response.json(
            201, self._describe(name, order, []), headers=(("location", f"/v1/topics/{name}"),)
        )

    async def _delete(self, _: Request, name: str) -> Response:
        broker = self._broker
        if broker.shutting_down:
            return Response.error(503, "the broker is draining for a shutdown")
        try:
            done = await trio.to_thread.run_sync(
                lambda: delete_topic_file(
                    broker.log.path,
                    name,
                    broker.config.storage.dir or None,
                    mode=broker.config.cxl.mode,
                )
            )
        except KeyError:
            return Response.error(404, f"no topic {name!r}")
        except TopicBusyError as exc:
            return Response.error(409, str(exc))
        logger.info("deleted topic %r over HTTP: %d segment(s) freed", name, done.segments)
        return Response.json(
            200,
            {
                "deleted": name,
                "segments_freed": done.segments,
                "disk_files_renamed": [str(p) for p in done.renamed],
            },
        )


async def create_topic(
    broker: Administered,
    name: str,
    order: int | None,
    retention: Mapping[str, int],
    *,
    via: str,
) -> int:
    """Create topic ``name`` in the broker's region (``POST /v1/topics``, and
    ``CreateNewTopic`` of the gRPC cluster service).

    Args:
        broker: The broker whose region gets it.
        name: The topic (checked with :func:`check_topic`).
        order: Its order level; None for the one its first batch would
            create it with (the config's).
        retention: Its own retention keys (checked), the others the config's.
        via: Whose request it is, for the log line.

    Returns:
        The order level it was created with.

    Raises:
        TopicExistsError: It exists; nothing changed.
        LogFullError: The topic table is full.
    """
    # Not given: the order a first batch would create it with.
    order = broker.settings_for(name).order if order is None else order
    await trio.to_thread.run_sync(
        lambda: create_topic_file(
            broker.log.path, name, order=order, mode=broker.config.cxl.mode, **retention
        )
    )
    logger.info("created topic %r over %s (%s)", name, via, _settings_text(order, retention))
    return order


def check_topic(name: str, order: int | None, retention: Mapping[str, object]) -> dict[str, int]:
    """Check a topic to be created: its name, order level and retention keys.

    Args:
        name: The topic's name.
        order: Its order level (None: the config's).
        retention: Retention keys to values (None values are left out).

    Returns:
        The retention keys given.

    Raises:
        ValueError: Saying what is wrong (in the admin API's words).
    """
    encode_topic(name)  # raises ValueError naming the rule
    if order is not None and type(order) is not int:
        raise ValueError(f'"order" must be an integer: {order!r}')
    if order is not None and order not in ORDER_LEVELS:
        raise ValueError(
            f"order {order} is not an order level: 0 (each broker's stream in its own "
            "order) or 5 (one total order across brokers)"
        )
    given = {}
    for key in RETENTION_KEYS:
        value = retention.get(key)
        if value is None:
            continue
        if type(value) is not int:
            raise ValueError(f'"{key}" must be an integer (-1 for no limit): {value!r}')
        given[key] = value
    try:
        TopicOverride(**given)  # the config's checks: -1, or > 0
    except ValueError as exc:
        raise ValueError(str(exc).replace("'", '"')) from None
    return given


def _topic_to_create(body: bytes) -> tuple[str, int | None, dict[str, int]]:
    """The name, order (None: not given) and retention keys of a ``POST
    /v1/topics`` body.

    Raises:
        ValueError: Saying what is wrong with it.
    """
    try:
        data = json.loads(body or b"null")
    except ValueError as exc:
        raise ValueError(f"the body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(
            'the body must be a JSON object, e.g. {"name": "orders", "retention_ms": 604800000}'
        )
    unknown = sorted(set(data) - _TOPIC_FIELDS)
    if unknown:
        raise ValueError(
            f"unknown field(s) {', '.join(unknown)}; a topic has {', '.join(sorted(_TOPIC_FIELDS))}"
        )
    name = data.get("name")
    if not isinstance(name, str):
        raise ValueError('"name" must be given, a string')
    order = data.get("order")  # None: the config's order for the topic
    return name, order, check_topic(name, order, data)


def _disk_files(storage_dir: str) -> dict[tuple[str, int], list[tuple[int, int]]]:
    # No directory yet: nothing was written to it.
    return stream_files(storage_dir) if os.path.isdir(storage_dir) else {}


def _settings_text(order: int, retention: Mapping[str, int]) -> str:
    keys = ", ".join(f"{k} {v}" for k, v in retention.items())
    return f"order {order}" + (f", {keys}" if keys else ", the config's retention")
