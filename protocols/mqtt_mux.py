"""Many MQTT connections on one thread: the transport of a fleet-simulation worker.

:class:`MqttTransport` gives every connection paho's own network thread, and a simulated device a
serving thread beside it: thousands of agents in one process were thousands of threads, and a worker
stopped connecting after ~700 (issue 16). Here one :class:`MuxLoop` thread drives every connection of a
process through paho's external-loop interface (``loop_read`` / ``loop_write`` / ``loop_misc`` on a
``selectors`` poll, sockets registered by paho's socket callbacks), and one serving thread (the
caller of :meth:`MuxLoop.serve`) runs every handler: received messages of all connections wait in one
bounded queue, in arrival order. An idle connection costs its socket, its paho client (~4 KB) and this
module's few fields.

Each :class:`MuxClient` is still a whole MQTT client, as a device's: its own client id, connection,
last will, birth message, subscriptions, QoS 1 everywhere, and the chunk envelopes and reassembly of
``protocols/chunking.py`` (keyed per connection, so one retained message delivered to many connections
is each connection's own). Connections are opened at a bounded rate (``connect_rate`` per second) and a
refused or dropped one is retried with back-off (1 s doubling to 30 s); a connection that has not come
up within ``connect_timeout`` seconds of trying, or that the broker refused 5 times in a row (~8 s), or a
CONNACK that retrying cannot fix (bad credentials, not authorized), sets :attr:`MuxLoop.failure`:
:meth:`MuxLoop.serve` then raises ``TransportError`` with that one line, so a worker fails fast instead
of waiting for agents that will never come.

Differences from :class:`MqttTransport`, on purpose: ``subscribe`` does not wait for the SUBACK (the
broker handles one connection's packets in order, so a subscription made before a publish on the same
connection is in place before anyone sees that publish; refusals are logged and counted); the MQTT
version is fixed by the caller (``protocol``), with no MQTT 5 to 3.1.1 probing per connection.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import selectors
import socket
import ssl
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from protocols.chunking import DEFAULT_LIMIT, DEFAULT_MAX_MESSAGE, ChunkError, Reassembler, split
from protocols.mqtt import TlsConfig, parse_url
from protocols.topics import matches
from protocols.transport import Handler, Transport, TransportError

log = logging.getLogger("fedcmd.mqtt_mux")

_WINDOW = 16  # chunks of one message in flight before publish waits for the oldest acknowledgement
_TOPIC_OVERHEAD = 16  # MQTT PUBLISH bytes beside topic and payload
_FATAL_CONNACK = {"Bad user name or password", "Not authorized", "Client identifier not valid", "Banned"}
_BACKOFF = (1.0, 30.0)  # first and longest wait before reconnecting
_FIRST_TRIES = 5  # a first connection refused this often in a row (0.5 + 1 + 2 + 4 s) is a broker saying no
_MISC_EVERY_S = 1.0  # keepalive bookkeeping (paho's loop_misc) per connection, about this often
_MESSAGE_COST = 256  # per queued message: the tuple and the bytes object's header


class MuxLoop:
    """One thread serving many :class:`MuxClient` connections to one broker (see the module docstring).

    ``max_inbox_bytes`` bounds the received messages waiting for :meth:`serve` (oldest dropped first,
    counted in ``dropped``); ``max_message_bytes`` one reassembled message."""

    def __init__(
        self,
        url: str,
        *,
        protocol: Literal["5", "3.1.1"] | None = None,
        tls: TlsConfig | None = None,
        connect_rate: float = 500.0,
        connect_timeout: float = 30.0,
        keepalive: int = 60,
        publish_timeout: float = 60.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE,
        max_inbox_bytes: int = 512 * 2**20,
        name: str = "mqtt-mux",
    ) -> None:
        address = parse_url(url)
        if connect_rate <= 0 or connect_timeout <= 0:
            raise ValueError("connect_rate and connect_timeout must be positive")
        self.url = url
        self.address = address
        self.protocol: Literal["5", "3.1.1"] = protocol or ("3.1.1" if address.protocol == "3.1.1" else "5")
        self.tls = tls if tls is not None else (TlsConfig("") if address.tls else None)
        self.connect_rate = connect_rate
        self.connect_timeout = connect_timeout
        self.keepalive = keepalive
        self.publish_timeout = publish_timeout
        self.failure: str | None = None  # why this loop cannot go on; serve() raises it
        self.stats: Counter[str] = Counter()  # connects, disconnects, connect_retries, messages/chunks in/out
        self.rejected: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        self._reasm = Reassembler(60.0, max_message_bytes, on_drop=self._on_drop)
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._lock = threading.Lock()  # guards the queues below (any thread adds, the loop thread takes)
        self._to_connect: deque[MuxClient] = deque()  # first connections, opened at connect_rate
        self._retry: list[tuple[float, int, MuxClient]] = []  # (when, seq, client): reconnects with back-off
        self._seq = itertools.count()
        self._to_write: set[MuxClient] = set()
        self._to_close: deque[MuxClient] = deque()
        self._clients: list[MuxClient] = []
        self._misc_at = 0  # index of the next client whose keepalive is looked after
        self._misc_next = 0.0
        self._tokens = 1.0
        self._tokens_at = time.monotonic()
        # received messages for serve(): (client, topic, frame), oldest first, bounded in bytes
        self._inbox: deque[tuple[MuxClient, str, bytes]] = deque()
        self._inbox_bytes = 0
        self.max_inbox_bytes = max_inbox_bytes
        self._cond = threading.Condition()  # inbox arrivals and broker acknowledgements
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------------------------- public
    @property
    def connected(self) -> int:
        """Connections up now."""
        return sum(1 for c in self._clients if c.connected)

    def add(self, client: MuxClient) -> None:
        """Queue ``client``'s first connection (opened at ``connect_rate``, retried until it works)."""
        with self._lock:
            self._clients.append(client)
            self._to_connect.append(client)
        self._wake()

    def serve(self, done: Callable[[], bool], timeout: float | None = None) -> bool:
        """Run the handlers of every received message on this thread until ``done()`` or ``timeout``;
        returns ``done()``. ``TransportError`` once the loop has failed (:attr:`failure`)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not done():
            if self.failure is not None:
                raise TransportError(self.failure)
            wait = 0.2
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                wait = min(wait, remaining)
            with self._cond:
                if not self._inbox:
                    self._cond.wait(wait)
                if not self._inbox:
                    continue
                client, topic, frame = self._inbox.popleft()
                self._inbox_bytes -= len(frame) + _MESSAGE_COST
            client._dispatch(topic, frame)
        return done()

    def close(self) -> None:
        """Disconnect every client cleanly (no last wills) and stop the thread."""
        if self._closed:
            return
        for client in list(self._clients):
            client.close()
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and any(c._sock_open for c in self._clients):
            time.sleep(0.02)
        self._closed = True
        self._wake()
        self._thread.join(5.0)
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    # ------------------------------------------------------------------------------ the thread
    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except (BlockingIOError, OSError):
            pass  # already woken (buffer full) or closing

    def _run(self) -> None:
        try:
            while not self._closed:
                self._step()
        except Exception as e:  # a bug here must not leave serve() waiting forever
            log.exception("MQTT loop failed")
            self.failure = f"the MQTT connection loop failed: {type(e).__name__}: {e}"
            with self._cond:
                self._cond.notify_all()

    def _step(self) -> None:
        now = time.monotonic()
        self._open_connections(now)
        with self._lock:
            closing = list(self._to_close)
            self._to_close.clear()
        for client in closing:
            client._do_close()
        self._write_pending()
        timeout = 0.05 if (self._to_connect or self._retry) else 0.25
        for key, mask in self._sel.select(timeout):
            client = key.data
            if client is None:
                try:
                    while self._wake_r.recv(4096):
                        pass
                except (BlockingIOError, OSError):
                    pass
                continue
            if mask & selectors.EVENT_READ and client._sock_open:
                client._paho.loop_read()
            if mask & selectors.EVENT_WRITE and client._sock_open:
                client._paho.loop_write()
                client._sync_write()
        self._write_pending()  # what the reads queued (PUBACKs, re-sends after a CONNACK)
        if now >= self._misc_next:
            self._misc_next = now + _MISC_EVERY_S / 4
            self._keepalive_slice()

    def _write_pending(self) -> None:
        with self._lock:
            writers, self._to_write = self._to_write, set()
        for client in writers:
            if client._sock_open:
                client._paho.loop_write()
                client._sync_write()

    def _open_connections(self, now: float) -> None:
        self._tokens = min(self._tokens + (now - self._tokens_at) * self.connect_rate, max(1.0, self.connect_rate / 10))
        self._tokens_at = now
        while self._tokens >= 1:
            with self._lock:
                if self._retry and self._retry[0][0] <= now:
                    client = heapq.heappop(self._retry)[2]
                elif self._to_connect:
                    client = self._to_connect.popleft()
                else:
                    return
            self._tokens -= 1
            client._attempt(now)

    def _schedule_retry(self, client: MuxClient, delay: float) -> None:
        with self._lock:
            heapq.heappush(self._retry, (time.monotonic() + delay, next(self._seq), client))

    def _keepalive_slice(self) -> None:
        # Each connection's loop_misc about once per _MISC_EVERY_S: PINGREQs and a dead broker's timeout.
        n = len(self._clients)
        if not n:
            return
        count = max(1, n // 4)  # called every quarter of _MISC_EVERY_S
        for _ in range(min(count, n)):
            self._misc_at %= n
            client = self._clients[self._misc_at]
            self._misc_at += 1
            if client._sock_open:
                client._paho.loop_misc()
            client._check_first_connect()

    def _fail(self, text: str) -> None:
        if self.failure is None:
            self.failure = text
            log.error("%s", text)
        with self._cond:
            self._cond.notify_all()

    # ----------------------------------------------------------------------------- messages
    def _deliver(self, client: MuxClient, topic: str, frame: bytes) -> None:
        cost = len(frame) + _MESSAGE_COST
        with self._cond:
            self._inbox.append((client, topic, frame))
            self._inbox_bytes += cost
            while self._inbox_bytes > self.max_inbox_bytes and len(self._inbox) > 1:
                _, old_topic, old = self._inbox.popleft()
                self._inbox_bytes -= len(old) + _MESSAGE_COST
                self.dropped["inbox_global"] += 1
                log.warning("dropped a received message of %d bytes on %s not yet handled (%d queued bytes max)",
                            len(old), old_topic, self.max_inbox_bytes)
            self._cond.notify()

    def _on_drop(self, kind: str, topic: str, text: str) -> None:
        self.dropped[kind] += 1
        self.rejected[kind] += 1
        log.debug("%s", text)


class MuxClient(Transport):
    """One MQTT client (its own client id, connection, will and subscriptions) served by a :class:`MuxLoop`.

    ``will`` is ``(topic, payload, retain)``, sent by the broker if the connection dies; ``birth`` is
    published on every (re)connect. ``publish`` waits for the broker's acknowledgement of every chunk
    (``TransportError`` after the loop's ``publish_timeout`` while connected, or once the loop failed);
    while disconnected it waits for the reconnection, whose CONNACK re-sends what was not acknowledged."""

    def __init__(
        self,
        loop: MuxLoop,
        client_id: str,
        *,
        will: tuple[str, bytes, bool] | None = None,
        birth: tuple[str, bytes, bool] | None = None,
        username: str | None = None,
        password: str | None = None,
        session_expiry: int = 300,
        packet_limit: int = DEFAULT_LIMIT,
    ) -> None:
        if not client_id:
            raise ValueError("client_id must be a non-empty string")
        self.loop = loop
        self.client_id = client_id
        self.packet_limit = packet_limit
        self.reconnects = 0
        self.connected = False
        self._sock_open = False
        self._watching_write = False
        self._started = False
        self._closed = False
        self._connects = 0
        self._backoff = _BACKOFF[0] / 2  # first connections retry sooner: a refusing broker is found in seconds
        self._failed_tries = 0
        self._first_try: float | None = None
        self._last_error = "no answer from the broker yet"
        self._broker_max_packet: int | None = None
        self._will = self._one_chunk(will, "will")
        self._birth = self._one_chunk(birth, "birth")
        self._subs: list[tuple[str, Handler]] = []
        self._filters: list[str] = []
        self._acks: dict[int, list[ReasonCode]] = {}
        self._abandoned: set[int] = set()
        self._fire_and_forget: set[int] = set()
        self._epoch = 0
        v5 = loop.protocol == "5"
        paho = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else True,
        )
        paho.max_queued_messages_set(0)
        paho.max_inflight_messages_set(_WINDOW * 2)
        paho.connect_timeout = 5.0
        user = username if username is not None else loop.address.username
        if user is not None:
            paho.username_pw_set(user, password if password is not None else loop.address.password)
        if loop.tls is not None:
            ctx = ssl.create_default_context(cafile=loop.tls.ca_file or None)
            if loop.tls.cert_file:
                ctx.load_cert_chain(loop.tls.cert_file, loop.tls.key_file)
            paho.tls_set_context(ctx)
        if self._will is not None:
            paho.will_set(*self._envelope(self._will)[:2], qos=1, retain=self._will[2])
        paho.on_connect = self._on_connect
        paho.on_disconnect = self._on_disconnect
        paho.on_message = self._on_message
        paho.on_publish = self._on_ack
        paho.on_subscribe = self._on_subscribe
        paho.on_socket_open = self._on_socket_open
        paho.on_socket_close = self._on_socket_close
        paho.on_socket_register_write = self._on_register_write
        paho.on_socket_unregister_write = self._on_unregister_write
        self._session_expiry = session_expiry
        self._paho = paho

    # ----------------------------------------------------------------------------- envelopes
    def _chunk_limit(self, topic: str) -> int:
        limit = self.packet_limit
        if self._broker_max_packet:
            limit = min(limit, self._broker_max_packet)
        return limit - len(topic.encode()) - _TOPIC_OVERHEAD

    def _one_chunk(self, message: tuple[str, bytes, bool] | None, what: str) -> tuple[str, bytes, bool] | None:
        if message is not None and len(split(message[1], self._chunk_limit(message[0]))) != 1:
            raise ValueError(f"the {what} message must fit one packet ({len(message[1])} bytes is too large)")
        return message

    def _envelope(self, message: tuple[str, bytes, bool]) -> tuple[str, bytes, bool]:
        topic, payload, retain = message
        return topic, split(payload, self._chunk_limit(topic))[0], retain

    def set_birth(self, birth: tuple[str, bytes, bool] | None) -> None:
        self._birth = self._one_chunk(birth, "birth")

    # ---------------------------------------------------------------------- connecting (loop thread)
    def _attempt(self, now: float) -> None:
        if self._closed:
            return
        if self._first_try is None:
            self._first_try = now
        try:
            if not self._started:
                self._started = True
                if self.loop.protocol == "5":
                    props = Properties(PacketTypes.CONNECT)
                    props.SessionExpiryInterval = self._session_expiry
                    self._paho.connect(self.loop.address.host, self.loop.address.port, self.loop.keepalive,
                                       clean_start=mqtt.MQTT_CLEAN_START_FIRST_ONLY, properties=props)
                else:
                    self._paho.connect(self.loop.address.host, self.loop.address.port, self.loop.keepalive)
            else:
                self.loop.stats["connect_retries"] += 1
                self._paho.reconnect()
        except (OSError, ssl.SSLError) as e:
            self._last_error = f"{type(e).__name__}: {e}"
            self._retry_later()

    def _retry_later(self) -> None:
        if self._closed:
            return
        if not self._connects:
            self._failed_tries += 1
        delay, self._backoff = self._backoff, min(self._backoff * 2, _BACKOFF[1])
        self.loop._schedule_retry(self, delay)

    def _check_first_connect(self) -> None:
        """Called now and then by the loop: a first connection that has not come up in time, or that the
        broker refused _FIRST_TRIES times in a row (closed before its CONNACK: e.g. max_connections), is fatal."""
        if self._connects or self._closed or self._first_try is None:
            return
        refused = self._failed_tries >= _FIRST_TRIES
        if refused or time.monotonic() - self._first_try > self.loop.connect_timeout:
            self.loop._fail(
                f"cannot connect to the MQTT broker at {self.loop.url} as {self.client_id!r} within "
                f"{self.loop.connect_timeout:.0f} s: {self._last_error}"
            )

    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._sock_open = True
        self._watching_write = False
        self.loop._sel.register(sock, selectors.EVENT_READ, self)

    def _on_socket_close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._sock_open = False
        try:
            self.loop._sel.unregister(sock)
        except (KeyError, ValueError):
            pass

    def _on_register_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        # Any thread. paho's own registered-write flag can miss a packet queued by one thread while another
        # writes, so the loop does not trust it: it writes this client next and then watches the socket for
        # writability exactly while paho still has bytes to send (_sync_write).
        with self.loop._lock:
            self.loop._to_write.add(self)
        if threading.current_thread() is not self.loop._thread:
            self.loop._wake()

    def _on_unregister_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        pass  # see _on_register_write: _sync_write decides

    def _sync_write(self) -> None:
        want = self._paho.want_write()
        if want == self._watching_write:
            return
        sock = self._paho.socket()
        if sock is None or not self._sock_open:
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if want else 0)
        try:
            self.loop._sel.modify(sock, events, self)
            self._watching_write = want
        except (KeyError, ValueError):
            pass

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any) -> None:
        if reason.is_failure:
            self._last_error = f"broker refused the connection: {reason}"
            if str(reason) in _FATAL_CONNACK:
                self.loop._fail(f"the MQTT broker at {self.loop.url} refused client {self.client_id!r}: {reason}")
            return
        self._broker_max_packet = getattr(props, "MaximumPacketSize", None) if props is not None else None
        self._connects += 1
        self._backoff = _BACKOFF[0]
        self.loop.stats["connects"] += 1
        with self.loop._cond:
            self.connected = True
            self._epoch += 1
            self.loop._cond.notify_all()
        if self._filters:
            _, mid = client.subscribe([(f, self._sub_options()) for f in self._filters])
            self._fire_and_forget.add(mid)
        if self._birth is not None:
            topic, payload, retain = self._envelope(self._birth)
            self._fire_and_forget.add(client.publish(topic, payload, qos=1, retain=retain).mid)
        if self._will is not None:  # a fresh chunk id for the next connection's will
            client.will_set(*self._envelope(self._will)[:2], qos=1, retain=self._will[2])
        if self._connects > 1:
            self.reconnects += 1

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any) -> None:
        was = self.connected
        with self.loop._cond:
            self.connected = False
            self.loop._cond.notify_all()
        if self._closed:
            return
        self._last_error = f"connection lost: {reason}" if was else f"the broker closed the connection: {reason}"
        if was:
            self.loop.stats["disconnects"] += 1
            log.warning("%s: lost the broker %s (%s); reconnecting with back-off", self.client_id, self.loop.url,
                        reason)
        self._retry_later()

    def _sub_options(self) -> Any:
        return SubscribeOptions(qos=1) if self.loop.protocol == "5" else 1

    # --------------------------------------------------------------------------------- acks
    def _on_ack(self, client: mqtt.Client, userdata: Any, mid: int, reason: ReasonCode, props: Any) -> None:
        with self.loop._cond:
            if mid in self._fire_and_forget:
                self._fire_and_forget.discard(mid)
            elif mid in self._abandoned:
                self._abandoned.discard(mid)
            else:
                self._acks[mid] = [reason]
                self.loop._cond.notify_all()

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: list[ReasonCode],
                      props: Any) -> None:
        self._fire_and_forget.discard(mid)
        if any(r.is_failure for r in reasons):
            self.loop.rejected["subscribe_refused"] += 1
            log.warning("%s: the broker refused a subscription: %s", self.client_id, [str(r) for r in reasons])

    def _wait_ack(self, mid: int, what: str) -> list[ReasonCode]:
        deadline = time.monotonic() + self.loop.publish_timeout
        cond = self.loop._cond
        with cond:
            while mid not in self._acks:
                now = time.monotonic()
                if self._closed or self.loop.failure is not None:
                    self._abandoned.add(mid)
                    why = self.loop.failure or "closed"
                    raise TransportError(f"{what}: no acknowledgement from the broker at {self.loop.url} ({why})")
                if not self.connected:
                    deadline = now + self.loop.publish_timeout  # the timer runs only while connected
                elif now >= deadline:
                    self._abandoned.add(mid)
                    raise TransportError(f"{what}: no acknowledgement from the broker at {self.loop.url} within "
                                         f"{self.loop.publish_timeout} s (connected)")
                cond.wait(0.5)
            return self._acks.pop(mid)

    # ---------------------------------------------------------------------------- Transport
    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        if self._closed:
            raise TransportError(f"publish to {topic}: the transport is closed")
        if not topic or any(c in topic for c in "+#"):
            raise ValueError(f"cannot publish to {topic!r}: a topic name has no wildcards")
        chunks = split(bytes(payload), self._chunk_limit(topic))
        if retain and len(chunks) > 1:
            raise ValueError(f"retained message of {len(payload)} bytes on {topic} does not fit one packet")
        pending: list[int] = []
        for chunk in chunks:
            info = self._paho.publish(topic, chunk, qos=1, retain=retain)
            pending.append(info.mid)
            self.loop.stats["chunks_out"] += 1
            while len(pending) >= _WINDOW:
                self._check_ack(self._wait_ack(pending.pop(0), f"publish to {topic}"), topic)
        for mid in pending:
            self._check_ack(self._wait_ack(mid, f"publish to {topic}"), topic)
        self.loop.stats["messages_out"] += 1
        self.loop.stats["bytes_out"] += len(payload)

    def publish_nowait(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """Send a one-packet message (QoS 1, re-sent by paho until acknowledged) without waiting for the
        acknowledgement: for thousands of start-up presences, which would otherwise each wait a round trip."""
        if self._closed:
            raise TransportError(f"publish to {topic}: the transport is closed")
        _, chunk, _ = self._envelope((topic, bytes(payload), retain))
        with self.loop._cond:
            info = self._paho.publish(topic, chunk, qos=1, retain=retain)
            self._fire_and_forget.add(info.mid)
        self.loop.stats["chunks_out"] += 1
        self.loop.stats["messages_out"] += 1

    @staticmethod
    def _check_ack(reasons: list[ReasonCode], topic: str) -> None:
        bad = [str(r) for r in reasons if r.is_failure]
        if bad:
            raise TransportError(f"the broker refused the message on {topic}: {', '.join(bad)}")

    def subscribe(self, topic_filter: str, handler: Handler) -> None:
        """Register ``handler``; the SUBSCRIBE goes out now (or with the connection), not awaited."""
        if self._closed:
            raise TransportError(f"subscribe to {topic_filter}: the transport is closed")
        self._subs.append((topic_filter, handler))
        if topic_filter in self._filters:
            return
        self._filters.append(topic_filter)
        if self.connected:
            rc, mid = self._paho.subscribe([(topic_filter, self._sub_options())])
            if rc == mqtt.MQTT_ERR_SUCCESS:
                self._fire_and_forget.add(mid)

    def unsubscribe(self, topic_filter: str) -> None:
        """Drop every handler of ``topic_filter`` and the subscription at the broker."""
        self._subs = [(f, h) for f, h in self._subs if f != topic_filter]
        if topic_filter in self._filters:
            self._filters.remove(topic_filter)
            if self.connected:
                self._paho.unsubscribe(topic_filter)

    def run_until(self, done: Callable[[], bool], timeout: float | None = None) -> bool:
        """Serve every client of the loop (one serving thread per process) until ``done()``."""
        return self.loop.serve(done, timeout)

    def close(self) -> None:
        """Disconnect cleanly (no last will); done by the loop thread."""
        if self._closed:
            return
        self._closed = True
        with self.loop._lock:
            self.loop._to_close.append(self)
        self.loop._wake()

    def _do_close(self) -> None:
        if not self._sock_open:
            return
        if self.loop.protocol == "5" and self.connected:
            props = Properties(PacketTypes.DISCONNECT)
            props.SessionExpiryInterval = 0
            self._paho.disconnect(ReasonCode(PacketTypes.DISCONNECT, "Normal disconnection"), props)
        else:
            self._paho.disconnect()

    # ---------------------------------------------------------------------------- receiving
    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            self.loop.rejected["bad_topic"] += 1
            return
        self.loop.stats["chunks_in"] += 1
        try:
            # keyed by connection: the same retained message reaches many connections, each its own copy
            frame = self.loop._reasm.feed(f"{self.client_id}\x00{topic}", msg.payload, dedupe=not msg.retain)
        except ChunkError as e:
            self.loop.rejected[e.kind] += 1
            log.debug("%s: rejected a chunk on %s: %s", self.client_id, topic, e)
            return
        if frame is not None:
            self.loop.stats["messages_in"] += 1
            self.loop._deliver(self, topic, frame)

    def _dispatch(self, topic: str, payload: bytes) -> None:
        for topic_filter, handler in list(self._subs):
            if not matches(topic_filter, topic):
                continue
            try:
                handler(topic, payload)
            except Exception:  # one bad message or handler bug must not stop the worker
                self.loop.rejected["handler_error"] += 1
                log.exception("%s: handler for %s raised on a message on %s", self.client_id, topic_filter, topic)
