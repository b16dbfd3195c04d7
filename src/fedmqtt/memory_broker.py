"""An in-process broker and its transport, the twin of transport.py's MQTT connection for fast unit tests of
the services: retained messages, wills, per-client queues, and delivery on the event loop as a real broker
gives it. No MQTT."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import Self

from fedmqtt.errors import TransportError
from fedmqtt.transport import ConnectOptions, Message, Will, topic_matches


class MemoryBroker:
    """An in-process broker with retained messages and wills, for unit tests of the services. Like
    Mosquitto (``max_queued_messages`` in mosquitto.conf), it queues at most ``max_queued`` undelivered
    messages per client and drops the rest; messages reach the handler later on the event loop, in order,
    never inside the publisher's call."""

    def __init__(self, max_queued: int = 10_000) -> None:
        self.max_queued = max_queued
        self.retained: dict[str, bytes] = {}
        self.clients: list[MemoryTransport] = []
        self.published: list[Message] = []

    def route(self, msg: Message) -> None:
        self.published.append(msg)
        if msg.retain:
            if msg.payload:
                self.retained[msg.topic] = msg.payload
            else:
                self.retained.pop(msg.topic, None)
        for c in self.clients:
            if any(topic_matches(f, msg.topic) for f in c.filters):
                c.deliver(Message(msg.topic, msg.payload, False))

    def connect(self, opts: ConnectOptions) -> MemoryTransport:
        """This broker as a :data:`Connector`."""
        return MemoryTransport(self, opts.client_id, opts.will, opts.on_message)


class MemoryTransport:
    def __init__(self, broker: MemoryBroker, client_id: str, will: Will | None = None,
                 on_message: Callable[[Message], None] | None = None) -> None:
        self.broker, self.client_id, self.will = broker, client_id, will
        self.on_message = on_message
        self.filters: list[str] = []
        self.connected = False
        self.dropped = 0  # messages beyond the broker's max_queued for this client
        self._pending: deque[Message] = deque()
        self._lost = asyncio.Event()

    async def __aenter__(self) -> Self:
        self.connected = True
        self.broker.clients.append(self)
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.connected = False
        if self in self.broker.clients:
            self.broker.clients.remove(self)
        if et is not None and self.will:  # an unclean end fires the last will
            self.broker.route(Message(self.will.topic, self.will.payload, self.will.retain))

    def drop(self) -> None:
        """Lose the connection, as a network fault would."""
        self._lost.set()

    async def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        if not self.connected or self._lost.is_set():
            raise TransportError("not connected")
        self.broker.route(Message(topic, bytes(payload), retain))

    def deliver(self, msg: Message) -> None:
        if len(self._pending) >= self.broker.max_queued:
            self.dropped += 1
            return
        self._pending.append(msg)
        asyncio.get_running_loop().call_soon(self._hand_over)

    def _hand_over(self) -> None:
        msg = self._pending.popleft()
        if self.on_message is not None and self.connected:
            self.on_message(msg)

    async def subscribe(self, topic: str, qos: int = 1) -> None:
        self.filters.append(topic)
        for t, payload in list(self.broker.retained.items()):
            if topic_matches(topic, t):
                self.deliver(Message(t, payload, True))

    async def unsubscribe(self, topic: str) -> None:
        self.filters = [f for f in self.filters if f != topic]

    async def peek(self, topic: str, qos: int = 1) -> None:
        for t, payload in list(self.broker.retained.items()):
            if topic_matches(topic, t):
                self.deliver(Message(t, payload, True))
        await asyncio.sleep(0)  # handed over before this returns, as from a broker

    async def closed(self) -> None:
        await self._lost.wait()
        raise TransportError("connection lost (MemoryTransport.drop)")
