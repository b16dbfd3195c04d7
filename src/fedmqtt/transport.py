"""The only module that speaks MQTT (aiomqtt on paho-mqtt 2.x). Its in-memory twin for fast tests is
memory_broker.py.

Both implement :class:`Transport`: an async context manager that connects, ``publish``, ``subscribe`` and
``closed`` (returns when the connection ends). Services build a new transport per connection attempt
(through a :data:`Connector`), so reconnecting is a loop around ``async with``.

Messages are received one way: the ``on_message`` handler of :class:`ConnectOptions`, called on the event
loop for each message, in order. Reading from the socket goes no faster than the handler, so a busy
service pushes back through TCP to the broker, which keeps the rest in the client's session queue; nothing
is read only to be dropped. A client that wants to ``await`` messages puts an :class:`Inbox` there.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any, NamedTuple, Protocol, Self
from urllib.parse import urlsplit

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fedmqtt import paho_patch
from fedmqtt.errors import ConfigError, TransportError

paho_patch.install()  # paho's PUBLISH decoder copies each payload four times


class Message(NamedTuple):
    topic: str
    payload: bytes
    retain: bool = False


class Will(NamedTuple):
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True)
class BrokerConfig:
    """Where and how to connect. Secrets come from the environment or a config file, never argv.

    ``BrokerConfig.from_url("mqtts://broker:8883")`` picks up ``FEDMQTT_USERNAME``, ``FEDMQTT_PASSWORD``,
    ``FEDMQTT_CA_FILE``, ``FEDMQTT_CERT_FILE`` and ``FEDMQTT_KEY_FILE`` when set.
    """

    host: str = "127.0.0.1"
    port: int = 1883
    tls: bool = False
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    keepalive: int = 30
    # seconds a connect, publish or subscribe may wait for the broker's reply: long enough for a model or an
    # update to cross a narrowband link behind a few retransmissions (a lost connection fails them at once)
    timeout: float = 60.0
    # seconds to wait for the CONNACK: a connect is a few bytes each way, and a node that does not answer
    # (a cluster electing new leaders) should be left for the next one well before ``timeout``
    connect_timeout: float = 15.0
    max_payload: int = 64 << 20
    protocol: int = 5  # 5 (MQTT 5) or 4 (MQTT 3.1.1, e.g. the embedded broker); payloads are the same
    # more nodes of a clustered broker, (host, port): each new connection attempt takes the next address
    fallbacks: tuple[tuple[str, int], ...] = ()

    @property
    def url(self) -> str:
        nodes = ",".join(f"{h}:{p}" for h, p in ((self.host, self.port), *self.fallbacks))
        return f"{'mqtts' if self.tls else 'mqtt'}://{nodes}{'?version=3.1.1' if self.protocol == 4 else ''}"

    @property
    def addresses(self) -> tuple[tuple[str, int], ...]:
        return ((self.host, self.port), *self.fallbacks)

    @classmethod
    def from_url(cls, url: str, *, env: dict[str, str] | None = None, **overrides: object) -> BrokerConfig:
        """``mqtt://host:port``; the nodes of a cluster comma-separated (``mqtt://a:1883,b:1883``); MQTT
        3.1.1 with ``?version=3.1.1`` (brokers that speak no MQTT 5: NATS, RabbitMQ).

        >>> BrokerConfig.from_url("mqtt://n1:1883,n2:1884?version=3.1.1", env={}).url
        'mqtt://n1:1883,n2:1884?version=3.1.1'
        """
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise ConfigError(f"broker URL {url!r} must start with mqtt:// or mqtts://")
        if "@" in parts.netloc:
            # a URL ends up in shell history and `ps`: credentials come from the environment instead
            raise ConfigError("put credentials in FEDMQTT_USERNAME / FEDMQTT_PASSWORD, not in the broker URL")
        tls = parts.scheme in ("mqtts", "ssl")
        nodes = []
        for node in parts.netloc.split(","):
            one = urlsplit(f"//{node}")
            if not one.hostname:
                raise ConfigError(f"broker URL {url!r} has no host")
            try:
                nodes.append((one.hostname, one.port or (8883 if tls else 1883)))
            except ValueError as exc:
                raise ConfigError(f"broker URL {url!r} has a bad port") from exc
        query = dict(q.partition("=")[::2] for q in parts.query.split("&") if q)
        versions = {"5": 5, "5.0": 5, "3.1.1": 4, "4": 4}
        if query.get("version", "5") not in versions or set(query) - {"version"}:
            raise ConfigError(f"broker URL {url!r}: the only option is version=5 or version=3.1.1")
        e = os.environ if env is None else env
        cfg = cls(
            host=nodes[0][0],
            port=nodes[0][1],
            fallbacks=tuple(nodes[1:]),
            protocol=versions[query.get("version", "5")],
            tls=tls,
            username=e.get("FEDMQTT_USERNAME"),
            password=e.get("FEDMQTT_PASSWORD"),
            ca_file=e.get("FEDMQTT_CA_FILE"),
            cert_file=e.get("FEDMQTT_CERT_FILE"),
            key_file=e.get("FEDMQTT_KEY_FILE"),
        )
        return replace(cfg, **overrides)  # type: ignore[arg-type]

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        ctx = ssl.create_default_context(cafile=self.ca_file)
        if self.cert_file:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx


class Transport(Protocol):
    async def __aenter__(self) -> Self: ...
    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None: ...
    async def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None: ...
    async def subscribe(self, topic: str, qos: int = 1) -> None: ...
    async def unsubscribe(self, topic: str) -> None: ...
    async def peek(self, topic: str, qos: int = 1) -> None:
        """Subscribe and unsubscribe at once (both packets go out before either reply): the broker sends what
        is retained on ``topic`` and nothing published later. Returns once both are acknowledged; the
        retained message, if any, has then been handed to ``on_message`` (a broker sends it before the
        UNSUBACK; MQTT allows one to drop it, so a caller that got nothing subscribes properly)."""
    async def closed(self) -> None:
        """Return when the connection ends; TransportError when it was lost."""


class ConnectOptions(NamedTuple):
    """What a service asks of its connection; where to connect is the :data:`Connector`'s business."""

    client_id: str
    will: Will | None = None
    clean_start: bool = True
    session_expiry: int = 0  # seconds the broker keeps the session (and queues QoS 1) after a disconnect
    on_message: Callable[[Message], None] | None = None  # every received message, in order (None: ignored)


Connector = Callable[[ConnectOptions], "Transport"]


def mqtt_connector(config: BrokerConfig) -> Connector:
    """A :data:`Connector` for a real broker."""

    attempts = itertools.count()

    def connect(opts: ConnectOptions) -> Transport:
        host, port = config.addresses[next(attempts) % len(config.addresses)]  # a cluster: round robin
        node = config if not config.fallbacks else replace(config, host=host, port=port)
        return MqttTransport(node, opts.client_id, will=opts.will, clean_start=opts.clean_start,
                             session_expiry=opts.session_expiry, on_message=opts.on_message, timeout=config.timeout)

    return connect


def _delivery(on_message: Callable[[Message], None] | None) -> type[asyncio.Queue[aiomqtt.Message]]:
    """aiomqtt's incoming-message queue (its public ``queue_type`` option) made into a hand-over: aiomqtt
    puts each message in with ``put_nowait`` from its socket reader, on the event loop; this queue hands it
    to ``on_message`` there and keeps nothing. This is the one place fedmqtt relies on how aiomqtt receives;
    tests/test_transport.py fails loudly if that changes."""

    class Delivery(asyncio.Queue[aiomqtt.Message]):
        def put_nowait(self, item: aiomqtt.Message) -> None:
            if on_message is not None:
                payload = item.payload if isinstance(item.payload, bytes | bytearray) else str(item.payload).encode()
                on_message(Message(item.topic.value, bytes(payload), bool(item.retain)))

    return Delivery


# aiomqtt warns on every publish while more than 10 are in flight, which the aggregator's concurrent acks do
# by design; its drops are counted (``dropped``). Lower this logger's level to see paho's own messages.
_MQTT_LOG = logging.getLogger("fedmqtt.mqtt")
_MQTT_LOG.setLevel(logging.ERROR)


class MqttTransport:
    """One MQTT connection (v5) through aiomqtt. Errors surface as :class:`TransportError`."""

    def __init__(
        self,
        config: BrokerConfig,
        client_id: str,
        *,
        will: Will | None = None,
        clean_start: bool = True,
        session_expiry: int = 0,
        on_message: Callable[[Message], None] | None = None,
        timeout: float = 10.0,
    ) -> None:
        props = None
        v5 = config.protocol == 5
        if session_expiry and v5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho is untyped
            props.SessionExpiryInterval = session_expiry
        self._client = aiomqtt.Client(
            config.host,
            config.port,
            identifier=client_id,
            username=config.username,
            password=config.password,
            protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
            will=aiomqtt.Will(will.topic, will.payload, will.qos, will.retain) if will else None,
            clean_start=clean_start if v5 else 3,  # 3 = paho's MQTT_CLEAN_START_FIRST_ONLY default
            clean_session=None if v5 else clean_start,
            properties=props,
            keepalive=config.keepalive,
            tls_context=config.ssl_context(),
            timeout=min(timeout, config.connect_timeout),  # the connect's; every other call passes its own
            queue_type=_delivery(on_message),
            logger=_MQTT_LOG,
        )
        self._timeout = timeout

    async def __aenter__(self) -> Self:
        try:
            await self._client.__aenter__()
        except aiomqtt.MqttError as exc:
            raise TransportError(f"cannot connect: {exc}") from exc
        # No Nagle: a small packet (an ack, the UNSUBSCRIBE right behind a SUBSCRIBE in peek) goes out at
        # once, not a round trip later behind unacknowledged data, which on a slow link costs seconds.
        sock = self._client._client.socket()  # aiomqtt's paho client: the one way to reach the socket
        if isinstance(sock, socket.socket):  # an SSLSocket is one too
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        try:
            await self._client.__aexit__(et, e, tb)
        except aiomqtt.MqttError as exc:
            if et is None:
                raise TransportError(f"disconnect failed: {exc}") from exc

    async def _reply(self, operation: Awaitable[object], what: str) -> None:
        """Wait for ``operation`` (up to the timeout), or fail as soon as the connection is lost: aiomqtt
        would let it wait out its whole timeout on a dead connection."""
        op: asyncio.Future[Any] = asyncio.ensure_future(operation)
        lost: asyncio.Future[Any] = self._client._disconnected  # the connection's end (no public handle)
        try:
            await asyncio.wait([op, lost], return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            op.cancel()
            raise
        if not op.done():
            op.cancel()
            raise TransportError(f"{what} failed: connection lost")
        try:
            op.result()
        except aiomqtt.MqttError as exc:
            raise TransportError(f"{what} failed: {exc}") from exc

    async def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        await self._reply(self._client.publish(topic, payload, qos=qos, retain=retain, timeout=self._timeout),
                          f"publish to {topic}")

    async def subscribe(self, topic: str, qos: int = 1) -> None:
        await self._reply(self._client.subscribe(topic, qos=qos, timeout=self._timeout), f"subscribe to {topic}")

    async def unsubscribe(self, topic: str) -> None:
        await self._reply(self._client.unsubscribe(topic, timeout=self._timeout), f"unsubscribe from {topic}")

    async def peek(self, topic: str, qos: int = 1) -> None:
        # SUBSCRIBE and UNSUBSCRIBE leave in one TCP segment (corked): if they went in two, losing the second
        # would hold the subscription open for a retransmission timeout (a second or more on a lossy link),
        # and every version published meanwhile would come down the link too.
        paho = self._client._client
        sock = paho.socket()
        tcp = sock if isinstance(sock, socket.socket) and hasattr(socket, "TCP_CORK") else None  # Linux
        if tcp is not None:
            with contextlib.suppress(OSError):
                tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
        try:
            sub = asyncio.ensure_future(self._client.subscribe(topic, qos=qos, timeout=self._timeout))
            unsub = asyncio.ensure_future(self._client.unsubscribe(topic, timeout=self._timeout))
            try:
                await asyncio.sleep(0)  # both tasks have run to their first wait: paho holds both packets
                for _ in range(8):  # aiomqtt writes them a few loop iterations later, at its write callback
                    if not paho.want_write():
                        break
                    await asyncio.sleep(0)
            except asyncio.CancelledError:
                sub.cancel()
                unsub.cancel()
                raise
        finally:
            if tcp is not None:
                with contextlib.suppress(OSError):
                    tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)  # out they go, together
        await self._reply(_both(sub, unsub), f"peek at {topic}")

    async def closed(self) -> None:
        # The message iterator waits on aiomqtt's queue (never filled: see _delivery) and on the connection,
        # so it ends exactly when the connection does, through aiomqtt's public API.
        try:
            async for _ in self._client.messages:
                pass
        except aiomqtt.MqttError as exc:
            raise TransportError(f"connection lost: {exc}") from exc


async def _both(a: asyncio.Future[Any], b: asyncio.Future[Any]) -> None:
    """Wait for both; then raise the first one's error, if any (every outcome retrieved, none logged as lost)."""
    try:
        await asyncio.wait([a, b])
    except asyncio.CancelledError:
        a.cancel()
        b.cancel()
        raise
    errors = [TransportError("cancelled") if f.cancelled() else f.exception() for f in (a, b)]
    for error in errors:
        if error is not None:
            raise error


class Inbox:
    """A bounded queue to put as ``on_message`` for clients that ``await`` their messages (readers, tests,
    ``fedmqtt watch``). A message that does not fit is counted in ``dropped``.

    >>> inbox = Inbox(maxsize=1)
    >>> inbox(Message("t", b"1")); inbox(Message("t", b"2")); inbox.dropped
    1
    """

    def __init__(self, maxsize: int = 0) -> None:
        self.queue: asyncio.Queue[Message] = asyncio.Queue(maxsize)
        self.dropped = 0

    def __call__(self, msg: Message) -> None:
        try:
            self.queue.put_nowait(msg)
        except asyncio.QueueFull:
            self.dropped += 1

    async def get(self, timeout: float | None = None) -> Message:
        return await asyncio.wait_for(self.queue.get(), timeout)

    def __aiter__(self) -> AsyncIterator[Message]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[Message]:
        while True:
            yield await self.queue.get()


def topic_matches(pattern: str, topic: str) -> bool:
    """MQTT filter matching with ``+`` and ``#``."""
    p, t = pattern.split("/"), topic.split("/")
    for i, part in enumerate(p):
        if part == "#":
            return True
        if i >= len(t) or (part != "+" and part != t[i]):
            return False
    return len(p) == len(t)
