"""MQTT transport: paho-mqtt 2.x, MQTT 5 (3.1.1 when the broker only speaks that), QoS 1 for everything.

Same semantics as :class:`protocols.memory.MemoryTransport` for the caller: ``publish`` returns once the
broker acknowledged the whole message, handlers run inside :meth:`MqttTransport.run_until` on the
caller's thread. Underneath, paho's network thread reconnects with back-off (1 s doubling to 30 s),
re-subscribes, and reassembles chunked messages (``protocols/chunking.py``) into a queue.

Outages: while the broker is unreachable, ``publish`` and ``subscribe`` wait for the reconnection (up to
``max_outage`` seconds of outage, default forever) instead of failing after ``publish_timeout``; what the
broker had not acknowledged is sent again on the new connection (paho 2.x keeps unacknowledged QoS 1
messages across reconnects and re-sends them after the CONNACK, whatever the session state; receivers
drop the duplicates by chunk id). ``reconnects`` counts completed re-connections: a broker restarted
without persistence has lost queued messages for subscribers that were offline, so the application
re-sends what it still needs answered (the coordinator re-sends the open round's tasks).

A clean :meth:`close` does not fire the last will: an agent publishes its "offline" presence itself
before closing. Each client id must be unique on the broker (a second connection with the same id
takes the session over and the two would keep kicking each other off).
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from protocols.chunking import DEFAULT_LIMIT, DEFAULT_MAX_MESSAGE, ChunkError, Reassembler, split
from protocols.topics import matches
from protocols.transport import Handler, Transport, TransportError

__all__ = ["BrokerAddress", "MqttTransport", "TlsConfig", "TransportError", "parse_url"]

log = logging.getLogger("fedcmd.mqtt")

Protocol = Literal["auto", "5", "3.1.1"]
_WINDOW = 16  # chunks of one message in flight before publish waits for the oldest acknowledgement
_TOPIC_OVERHEAD = 16  # MQTT PUBLISH bytes beside topic and payload: fixed header, packet id, properties
_IDLE_POLL_S = 0.2  # how often an idle run_until re-checks done() (changed from another thread)
_EXPIRE_EVERY_S = 1.0
# CONNACK refusals that retrying cannot fix: fail the constructor at once instead of waiting.
_NO_ANSWER = "no answer from the broker yet"
_FATAL_CONNACK = {"Bad user name or password", "Not authorized", "Client identifier not valid", "Banned"}
_WARNED_MAX = 4096  # (kind, topic) pairs already warned about: bounded, a flood may use many topics


@dataclass(frozen=True)
class TlsConfig:
    """TLS for ``mqtts://``: the CA that signed the broker's certificate, and optionally this client's
    certificate and key (mutual TLS)."""

    ca_file: str
    cert_file: str | None = None
    key_file: str | None = None


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = None
    protocol: Protocol = "auto"


def parse_url(url: str) -> BrokerAddress:
    """``mqtt://[user[:password]@]host[:port][?protocol=5|3.1.1]`` or ``mqtts://...`` (TLS, port 8883).

    The ``protocol`` query pins the MQTT version (``start_broker("amqtt")`` URLs carry ``3.1.1``:
    amqtt cannot even answer an MQTT 5 CONNECT that has properties)."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ValueError(f"broker URL must look like mqtt://host:port or mqtts://host:port, got {url!r}")
    query = parse_qs(parts.query, keep_blank_values=True)
    protocol = query.pop("protocol", ["auto"])[-1]
    if parts.path not in ("", "/") or query or parts.fragment or protocol not in ("auto", "5", "3.1.1"):
        raise ValueError(f"broker URL {url!r}: expected mqtt[s]://host:port with at most ?protocol=5|3.1.1")
    tls = parts.scheme == "mqtts"
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError:
        raise ValueError(f"broker URL {url!r} has an invalid port") from None
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    return BrokerAddress(parts.hostname, port, tls, user, password, protocol)  # type: ignore[arg-type]


class MqttTransport(Transport):
    """A :class:`~protocols.transport.Transport` over an MQTT broker (see the module docstring).

    ``packet_limit`` bounds every MQTT PUBLISH packet this client sends (topic and envelope included;
    lowered to the broker's advertised Maximum Packet Size when that is smaller). ``will`` is
    ``(topic, payload, retain)``, sent by the broker if the connection dies; ``birth`` is published
    (QoS 1, not awaited) on every (re)connect, e.g. a retained "online" presence that a broker restart
    without persistence would otherwise lose. ``connect_timeout``: seconds the constructor waits for
    the first connection (``TransportError`` after that); ``None`` returns at once and keeps trying in
    the background. ``publish_timeout``: seconds ``publish``/``subscribe`` wait, while connected, without
    any acknowledgement from the broker before raising ``TransportError``. ``max_outage``: seconds of
    broker outage (disconnected) they wait through before raising ``TransportError``; ``None`` waits
    for the reconnection however long it takes.

    Receiving: ``max_message_bytes`` bounds one reassembled message; ``max_sender_bytes`` /
    ``max_sender_streams`` bound what the incomplete messages of one sender (one topic) hold, and
    ``max_pending_bytes`` those of all senders (defaults: ``protocols.chunking.default_limits``, 2 x the
    message limit, 4 streams, min(8 x the message limit, 1 GiB)). Complete messages waiting for
    ``run_until`` are bounded by the same per-sender and global bytes. What is dropped to stay within
    them, oldest first, is counted in ``dropped`` (and ``rejected``) by kind; one warning per kind and
    sender.
    """

    def __init__(
        self,
        url: str,
        client_id: str,
        *,
        username: str | None = None,
        password: str | None = None,
        tls: TlsConfig | None = None,
        packet_limit: int = DEFAULT_LIMIT,
        will: tuple[str, bytes, bool] | None = None,
        keepalive: int = 30,
        reassembly_timeout: float = 60.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE,
        connect_timeout: float | None = 10.0,
        publish_timeout: float = 30.0,
        birth: tuple[str, bytes, bool] | None = None,
        protocol: Protocol = "auto",
        session_expiry: int = 300,
        max_outage: float | None = None,
        max_pending_bytes: int | None = None,
        max_sender_bytes: int | None = None,
        max_sender_streams: int | None = None,
    ) -> None:
        address = parse_url(url)
        if protocol == "auto":
            protocol = address.protocol
        if not client_id or len(client_id.encode()) > 65535:
            raise ValueError("client_id must be a non-empty string")
        if packet_limit < 512:
            raise ValueError(f"packet_limit {packet_limit} is too small (at least 512 bytes)")
        if max_outage is not None and max_outage < 0:
            raise ValueError(f"max_outage must be None (wait forever) or >= 0 seconds, not {max_outage}")
        self.url = url
        self.client_id = client_id
        self.packet_limit = packet_limit
        self.publish_timeout = publish_timeout
        self.max_outage = max_outage
        self.reconnects = 0
        self._host, self._port = address.host, address.port
        self._username = username if username is not None else address.username
        self._password = password if password is not None else address.password
        self._tls = tls
        self._use_tls = address.tls or tls is not None
        self._keepalive = keepalive
        self._session_expiry = session_expiry
        self._will = self._check_single_chunk(will, "will")
        self._birth = self._check_single_chunk(birth, "birth")

        self.rejected: Counter[str] = Counter()  # why incoming messages were dropped
        self.stats: Counter[str] = Counter()  # messages/bytes/chunks in and out, connects, disconnects
        self._warned: dict[tuple[str, str], None] = {}
        self._warned_lock = threading.Lock()
        self._reasm = Reassembler(
            reassembly_timeout,
            max_message_bytes,
            max_pending_bytes,
            max_sender_bytes=max_sender_bytes,
            max_sender_streams=max_sender_streams,
            on_drop=self._on_drop,
        )
        # Incomplete messages dropped, by kind: sender_streams, sender_bytes, global_bytes (to stay within
        # the receive limits) and expired; also counted in ``rejected``.
        self.dropped: Counter[str] = self._reasm.dropped
        self._inbox = _Inbox(self._reasm.max_sender_bytes, self._reasm.max_pending_bytes, self._on_inbox_drop)
        self._subs: list[tuple[str, Handler]] = []
        self._filters: list[str] = []  # distinct filters subscribed at the broker, in order
        self._lock = threading.Lock()
        self._connected = threading.Event()
        # monotonic time the broker became unreachable (or the transport was made); None while connected
        self._down_since: float | None = time.monotonic()
        self._epoch = 0  # connections so far: a SUBSCRIBE sent on an older one was lost with it
        self._closed = False
        self._broker_max_packet: int | None = None
        self._last_error = _NO_ANSWER
        self._fatal: str | None = None
        self._protocol_refused = threading.Event()
        # mid -> broker acknowledgement (reason codes), filled by the network thread for publish/subscribe
        self._acks: dict[int, list[ReasonCode]] = {}
        self._abandoned: set[int] = set()  # mids whose waiter gave up: their late acks are dropped
        self._fire_and_forget: set[int] = set()  # births and re-subscriptions sent from on_connect
        self._ack_cond = threading.Condition()
        self._next_expire = time.monotonic() + _EXPIRE_EVERY_S

        # "auto": MQTT 5, falling back to 3.1.1 when the broker refuses the protocol (amqtt speaks 3.1.1).
        self._auto_protocol = protocol == "auto"
        self.protocol: Literal["5", "3.1.1"] = "3.1.1" if protocol == "3.1.1" else "5"
        self._client = self._start_client()
        if connect_timeout is None:
            return
        try:
            connected = self._wait_first_connection(connect_timeout)
            if not connected and protocol == "auto" and self._protocol_refused.is_set():
                log.info("%s: broker %s refused MQTT 5; using MQTT 3.1.1", client_id, url)
                self._stop_client()
                self.protocol = "3.1.1"
                self._client = self._start_client()
                self._wait_first_connection(connect_timeout)
            if self._fatal is not None:
                # refused credentials or identity: a setup mistake (exit 2), not a broker that is down (3)
                raise CredentialsError(f"the MQTT broker at {url} refused client {client_id!r}: {self._fatal}")
            if not self._connected.is_set():
                reason = self._last_error
                if reason == _NO_ANSWER or reason.startswith("cannot reach"):
                    hint = " (a 3.1.1-only broker? add ?protocol=3.1.1 to the URL)" if self.protocol == "5" else ""
                    reason = self._diagnose() or f"the broker took the connection but did not answer the CONNECT{hint}"
                raise TransportError(
                    f"cannot connect to the MQTT broker at {url} as {client_id!r} within {connect_timeout} s: {reason}"
                )
        except BaseException:
            self._closed = True
            self._stop_client()
            raise

    # ------------------------------------------------------------------------------------ connection
    def _check_single_chunk(
        self, message: tuple[str, bytes, bool] | None, what: str
    ) -> tuple[str, bytes, bool] | None:
        """Wills and births are sent by the broker or from the network thread as one packet: check now that
        they fit one chunk envelope (``_envelope`` wraps them when they are sent)."""
        if message is not None and len(split(message[1], self._chunk_limit(message[0]))) != 1:
            raise ValueError(f"the {what} message must fit one packet ({len(message[1])} bytes is too large)")
        return message

    def _envelope(self, message: tuple[str, bytes, bool]) -> tuple[str, bytes, bool]:
        """A fresh one-chunk envelope (new message id) for every send: receivers drop a live message whose id
        they have already seen (a QoS 1 redelivery), and they may well have seen the previous connection's
        birth or will."""
        topic, payload, retain = message
        return topic, split(payload, self._chunk_limit(topic))[0], retain

    def set_birth(self, birth: tuple[str, bytes, bool] | None) -> None:
        """Publish ``birth`` on every later reconnect: for a message that is true only from some point on
        (an agent is "online" once it listens for tasks, not when it first connects)."""
        self._birth = self._check_single_chunk(birth, "birth")

    def _ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self._tls.ca_file if self._tls else None)
        if self._tls and self._tls.cert_file:
            ctx.load_cert_chain(self._tls.cert_file, self._tls.key_file)
        return ctx

    def _diagnose(self) -> str | None:
        """paho does not say why a connection attempt failed: retry once by hand to name the cause
        (refused, unreachable, certificate not trusted, ...)."""
        try:
            with socket.create_connection((self._host, self._port), timeout=5) as sock:
                if self._use_tls:
                    with self._ssl_context().wrap_socket(sock, server_hostname=self._host):
                        pass
        except (OSError, ssl.SSLError) as e:
            return f"{type(e).__name__}: {e}"
        return None

    def _start_client(self) -> mqtt.Client:
        v5 = self.protocol == "5"
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else True,
        )
        client.reconnect_delay_set(1, 30)
        client.max_queued_messages_set(0)
        client.max_inflight_messages_set(_WINDOW * 2)
        if self._username is not None:
            client.username_pw_set(self._username, self._password)
        if self._use_tls:
            # Verifies the broker's certificate and host name against the CA (system CAs without a TlsConfig).
            client.tls_set_context(self._ssl_context())
        if self._will is not None:
            client.will_set(*self._envelope(self._will)[:2], qos=1, retain=self._will[2])
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_connect_fail = self._on_connect_fail
        client.on_message = self._on_message
        client.on_publish = self._on_ack
        client.on_subscribe = self._on_subscribe
        if v5:
            props = Properties(PacketTypes.CONNECT)
            # The session (subscriptions, queued QoS 1 messages) survives a dropped connection this long;
            # clean start only on the first connect, so a restarted process does not get stale messages.
            props.SessionExpiryInterval = self._session_expiry
            client.connect_async(
                self._host, self._port, self._keepalive, clean_start=mqtt.MQTT_CLEAN_START_FIRST_ONLY, properties=props
            )
        else:
            client.connect_async(self._host, self._port, self._keepalive)
        client.loop_start()
        return client

    def _stop_client(self) -> None:
        self._connected.clear()
        try:
            self._client.disconnect()
        finally:
            self._client.loop_stop()

    def _wait_first_connection(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self._connected.is_set():
            if self._fatal is not None or self._protocol_refused.is_set():
                return False
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._connected.wait(min(remaining, 0.05))
        return True

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any) -> None:
        if reason.is_failure:
            self._last_error = f"broker refused the connection: {reason}"
            if self._auto_protocol and str(reason) == "Unsupported protocol version":
                self._protocol_refused.set()
            if str(reason) in _FATAL_CONNACK:
                self._fatal = str(reason)
            log.warning("%s: %s", self.client_id, self._last_error)
            return
        self._broker_max_packet = getattr(props, "MaximumPacketSize", None) if props is not None else None
        self.stats["connects"] += 1
        with self._lock:
            # Under the lock with subscribe(): a filter added concurrently is either in this snapshot or
            # sees the connected flag and subscribes itself.
            filters = list(self._filters)
            with self._ack_cond:
                down_since, self._down_since = self._down_since, None
                self._epoch += 1
                self._connected.set()
                self._ack_cond.notify_all()
        # Not awaited (this is the network thread): their acknowledgements are dropped in _on_ack/_on_subscribe.
        if filters:  # the session may be gone (broker restarted without persistence): subscribe again
            _, mid = client.subscribe([(f, self._sub_options()) for f in filters])
            with self._ack_cond:
                self._fire_and_forget.add(mid)
        if self._birth is not None:
            topic, payload, retain = self._envelope(self._birth)
            info = client.publish(topic, payload, qos=1, retain=retain)
            with self._ack_cond:
                self._fire_and_forget.add(info.mid)
        if self._will is not None:  # re-armed with a new id for the next connection (paho keeps it for reconnects)
            client.will_set(*self._envelope(self._will)[:2], qos=1, retain=self._will[2])
        if self.stats["connects"] > 1:
            # Counted after the re-subscription and birth went out: a reader that re-sends on this change
            # publishes behind them on the same connection.
            self.reconnects += 1
            outage = time.monotonic() - down_since if down_since is not None else 0.0
            log.warning(
                "%s: broker %s is back after an outage of %.1f s (reconnect %d, session present: %s)",
                self.client_id, self.url, outage, self.reconnects, flags.session_present,
            )

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        self._last_error = f"cannot reach {self._host}:{self._port} (connection refused or timed out)"

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any) -> None:
        if self._auto_protocol and self.stats["connects"] == 0 and self.protocol == "5":
            # Closed before any CONNACK: a 3.1.1-only broker (amqtt) may drop an MQTT 5 CONNECT this way.
            self._last_error = "the broker closed the connection without answering the MQTT 5 CONNECT"
            self._protocol_refused.set()
        with self._ack_cond:
            was = self._connected.is_set()
            self._connected.clear()
            if was:
                self._down_since = time.monotonic()
            self._ack_cond.notify_all()
        if was:
            self.stats["disconnects"] += 1
        if not self._closed:
            self._last_error = f"connection lost: {reason}"
            if was:  # one line per outage; failed attempts to reconnect are silent (see the "back" line)
                waits = "forever" if self.max_outage is None else f"up to {self.max_outage} s"
                log.warning(
                    "%s: lost the broker %s (%s); reconnecting with back-off, publish waits %s",
                    self.client_id, self.url, reason, waits,
                )

    def _sub_options(self) -> Any:
        return SubscribeOptions(qos=1) if self.protocol == "5" else 1

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float | None = None) -> bool:
        """Block until connected (True) or ``timeout`` seconds pass (False)."""
        return self._connected.wait(timeout)

    # ------------------------------------------------------------------------------------------ acks
    def _on_ack(self, client: mqtt.Client, userdata: Any, mid: int, reason: ReasonCode, props: Any) -> None:
        with self._ack_cond:
            if mid in self._fire_and_forget:
                self._fire_and_forget.discard(mid)
            elif mid in self._abandoned:
                self._abandoned.discard(mid)
            else:
                self._acks[mid] = [reason]
                self._ack_cond.notify_all()

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, reasons: list[ReasonCode], props: Any
    ) -> None:
        with self._ack_cond:
            if mid in self._fire_and_forget:
                self._fire_and_forget.discard(mid)
                if any(r.is_failure for r in reasons):
                    log.warning("%s: the broker refused a re-subscription: %s", self.client_id, reasons)
            elif mid in self._abandoned:
                self._abandoned.discard(mid)
            else:
                self._acks[mid] = list(reasons)
                self._ack_cond.notify_all()

    def _wait_ack(self, mid: int, what: str, epoch: int | None = None) -> list[ReasonCode]:
        """The broker's answer to ``mid``. ``publish_timeout`` runs only while connected; while the broker
        is unreachable this waits for paho's reconnection, which re-sends unacknowledged PUBLISHes, up to
        ``max_outage``. ``epoch``: the connection a SUBSCRIBE went out on; paho does not re-send those,
        ``_on_connect`` subscribes every filter again, so a newer connection is the answer (no reasons)."""
        deadline = time.monotonic() + self.publish_timeout
        with self._ack_cond:
            while mid not in self._acks:
                now = time.monotonic()
                if self._closed:
                    self._abandoned.add(mid)
                    raise TransportError(f"{what}: no acknowledgement from the broker at {self.url} (closed)")
                if epoch is not None and self._epoch != epoch and self._down_since is None:
                    self._abandoned.add(mid)
                    return []
                down = self._down_since
                if down is not None:
                    if self.max_outage is not None and now - down >= self.max_outage:
                        self._abandoned.add(mid)
                        raise TransportError(
                            f"{what}: no acknowledgement: the broker at {self.url} has been unreachable for "
                            f"{now - down:.1f} s (max_outage {self.max_outage} s; {self._last_error})"
                        )
                    deadline = now + self.publish_timeout  # the ack timer starts again once connected
                    wait = 0.5 if self.max_outage is None else min(0.5, down + self.max_outage - now)
                else:
                    wait = deadline - now
                    if wait <= 0:
                        self._abandoned.add(mid)
                        raise TransportError(
                            f"{what}: no acknowledgement from the broker at {self.url} within "
                            f"{self.publish_timeout} s (connected)"
                        )
                self._ack_cond.wait(min(wait, 0.5))
            return self._acks.pop(mid)

    # ------------------------------------------------------------------------------------ publishing
    def _chunk_limit(self, topic: str) -> int:
        limit = self.packet_limit
        broker_max = getattr(self, "_broker_max_packet", None)
        if broker_max:
            limit = min(limit, broker_max)
        return limit - len(topic.encode()) - _TOPIC_OVERHEAD

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """Send ``payload`` (any size: chunked below the packet limit) with QoS 1 and return once the
        broker acknowledged every chunk. While connected, ``TransportError`` after ``publish_timeout``
        seconds without an acknowledgement; while the broker is unreachable it waits for the reconnection
        (chunks not yet acknowledged are sent again then), ``TransportError`` once the outage has lasted
        ``max_outage`` seconds. Chunks already queued may still go out after an error (at least once). A
        retained message must fit one chunk."""
        if self._closed:
            raise TransportError(f"publish to {topic}: the transport is closed")
        if not topic or any(c in topic for c in "+#"):
            raise ValueError(f"cannot publish to {topic!r}: a topic name has no wildcards")
        chunks = split(bytes(payload), self._chunk_limit(topic))
        if retain and len(chunks) > 1:
            # The broker keeps only the last message per topic: a chunked retained message would be cut.
            raise ValueError(f"retained message of {len(payload)} bytes on {topic} does not fit one packet")
        pending: list[int] = []
        for chunk in chunks:
            info = self._client.publish(topic, chunk, qos=1, retain=retain)
            if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
                raise TransportError(f"publish to {topic}: paho's outgoing queue is full")
            pending.append(info.mid)
            self.stats["chunks_out"] += 1
            while len(pending) >= _WINDOW:
                self._check_ack(self._wait_ack(pending.pop(0), f"publish to {topic}"), topic)
        for mid in pending:
            self._check_ack(self._wait_ack(mid, f"publish to {topic}"), topic)
        self.stats["messages_out"] += 1
        self.stats["bytes_out"] += len(payload)

    @staticmethod
    def _check_ack(reasons: list[ReasonCode], topic: str) -> None:
        # MQTT 5 brokers say why they refused (e.g. an ACL: "Not authorized"); 3.1.1 ones stay silent.
        bad = [str(r) for r in reasons if r.is_failure]
        if bad:
            raise TransportError(f"the broker refused the message on {topic}: {', '.join(bad)}")

    @property
    def bytes_published(self) -> int:
        """Payload bytes published (before chunking), like ``MemoryTransport.bytes_published``."""
        return self.stats["bytes_out"]

    # ----------------------------------------------------------------------------------- subscribing
    def subscribe(self, topic_filter: str, handler: Handler) -> None:
        """Register ``handler`` for ``topic_filter``; when connected, returns after the broker's SUBACK.

        Retained messages on matching topics are delivered after this (possibly again to other handlers
        whose filters overlap: delivery is at least once)."""
        if self._closed:
            raise TransportError(f"subscribe to {topic_filter}: the transport is closed")
        with self._lock:
            self._subs.append((topic_filter, handler))
            if topic_filter not in self._filters:
                self._filters.append(topic_filter)
            connected = self._connected.is_set()
            epoch = self._epoch
        if not connected:
            return  # _on_connect subscribes every filter
        # Subscribing again also replays retained messages to the new handler, as the memory transport does.
        rc, mid = self._client.subscribe([(topic_filter, self._sub_options())])
        if rc != mqtt.MQTT_ERR_SUCCESS:
            return  # the connection dropped meanwhile: _on_connect will subscribe it
        self._check_ack(self._wait_ack(mid, f"subscribe to {topic_filter}", epoch), topic_filter)

    # -------------------------------------------------------------------------------------- receiving
    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            self.rejected["bad_topic"] += 1
            log.warning("%s: dropped a message whose topic is not UTF-8", self.client_id)
            return
        self.stats["chunks_in"] += 1
        try:
            # A retained message replayed to a new subscription must get through the duplicate filter.
            frame = self._reasm.feed(topic, msg.payload, dedupe=not msg.retain)
        except ChunkError as e:
            self.rejected[e.kind] += 1
            self._warn_once(e.kind, topic, f"rejected a chunk on {topic}: {e} ({e.kind})")
            frame = None
        if frame is not None:
            self.stats["messages_in"] += 1
            self.stats["bytes_in"] += len(frame)
            self._inbox.put(topic, frame)
        self._maybe_expire()

    def _maybe_expire(self) -> None:
        now = time.monotonic()
        if now < self._next_expire:
            return
        self._next_expire = now + _EXPIRE_EVERY_S
        self._reasm.expire(now)  # each stream dropped is counted and logged by _on_drop

    def _warn_once(self, kind: str, topic: str, text: str) -> None:
        """One warning per kind and sender (topic), later ones at debug level: a flood of junk must not
        flood the log. The counters (``rejected``, ``dropped``) count every one."""
        with self._warned_lock:  # the network thread and run_until's expiry both come here
            first = (kind, topic) not in self._warned
            self._warned[(kind, topic)] = None
            while len(self._warned) > _WARNED_MAX:
                del self._warned[next(iter(self._warned))]
        if not first:
            log.debug("%s: %s", self.client_id, text)
            return
        log.warning("%s: %s (further %s drops from this sender are only counted)", self.client_id, text, kind)

    def _on_drop(self, kind: str, topic: str, text: str) -> None:
        self.rejected[kind] += 1
        self._warn_once(kind, topic, text)

    def _on_inbox_drop(self, kind: str, topic: str, text: str) -> None:
        self.dropped[kind] += 1
        self._on_drop(kind, topic, text)

    def _dispatch(self, topic: str, payload: bytes) -> None:
        with self._lock:
            subs = list(self._subs)
        for topic_filter, handler in subs:
            if not matches(topic_filter, topic):
                continue
            try:
                handler(topic, payload)
            except Exception:  # a bad message or handler bug must not stop the loop
                self.rejected["handler_error"] += 1
                log.exception("%s: handler for %s raised on a message on %s", self.client_id, topic_filter, topic)

    def run_until(self, done: Callable[[], bool], timeout: float | None = None) -> bool:
        """Deliver received messages to the handlers on this thread until ``done()`` is true or ``timeout``
        seconds pass (``None``: no limit); returns ``done()``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not done():
            wait = _IDLE_POLL_S
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                wait = min(wait, remaining)
            message = self._inbox.get(wait)
            if message is None:
                self._maybe_expire()
                continue
            self._dispatch(*message)
        return done()

    # ------------------------------------------------------------------------------------------ close
    def close(self) -> None:
        """Disconnect cleanly (no last will) and stop the network thread. Publishes nothing itself."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.protocol == "5" and self._connected.is_set():
                props = Properties(PacketTypes.DISCONNECT)
                props.SessionExpiryInterval = 0  # a deliberate goodbye: the broker may forget the session now
                self._client.disconnect(ReasonCode(PacketTypes.DISCONNECT, "Normal disconnection"), props)
            else:
                self._client.disconnect()
        finally:
            self._client.loop_stop()
            self._connected.clear()
            with self._ack_cond:
                self._ack_cond.notify_all()

    def __enter__(self) -> MqttTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Inbox:
    """Complete messages waiting for ``run_until``, bounded like the reassembler: one sender (topic) may
    have ``per_sender`` bytes queued, all senders ``total`` (each message also counts a fixed overhead).
    Past that the sender's own oldest queued message is dropped (``inbox_sender``), or anyone's oldest
    (``inbox_global``). Much queues only while the application is busy elsewhere (aggregating), and a
    flood of complete junk messages must not grow it without end meanwhile."""

    _COST = 256  # per message: the entry, the tuple, the bytes object's header

    def __init__(self, per_sender: int, total: int, on_drop: Callable[[str, str, str], None]) -> None:
        self.per_sender, self.total, self.on_drop = per_sender, total, on_drop
        self._all: deque[list[Any]] = deque()  # [topic, payload (None once dropped), cost], oldest first
        self._by_topic: dict[str, deque[list[Any]]] = {}  # the live entries of each topic, oldest first
        self._bytes: Counter[str] = Counter()
        self._held = 0
        self._dead = 0  # dropped entries still in _all
        self._cond = threading.Condition()

    def put(self, topic: str, payload: bytes) -> None:
        entry = [topic, payload, len(payload) + self._COST]
        with self._cond:
            self._all.append(entry)
            self._by_topic.setdefault(topic, deque()).append(entry)
            self._bytes[topic] += entry[2]
            self._held += entry[2]
            while self._bytes.get(topic, 0) > self.per_sender:
                self._drop(self._by_topic[topic][0], "inbox_sender")
            while self._held > self.total:
                self._drop(next(e for e in self._all if e[1] is not None), "inbox_global")
            if self._dead > max(64, len(self._all) // 2):  # drop the dead entries' husks too
                self._all = deque(e for e in self._all if e[1] is not None)
                self._dead = 0
            self._cond.notify()

    def _take(self, entry: list[Any]) -> None:
        """Remove a live entry that is the oldest of its topic."""
        topic = entry[0]
        queued = self._by_topic[topic]
        queued.popleft()
        if not queued:
            del self._by_topic[topic]
        self._bytes[topic] -= entry[2]
        if self._bytes[topic] <= 0:
            del self._bytes[topic]
        self._held -= entry[2]

    def _drop(self, entry: list[Any], kind: str) -> None:
        self._take(entry)
        size = len(entry[1])
        entry[1] = None
        self._dead += 1
        limit = f"{self.per_sender} queued bytes per sender" if kind == "inbox_sender" else f"{self.total} in all"
        self.on_drop(kind, entry[0], f"dropped a received message of {size} bytes on {entry[0]} not yet "
                     f"handled, to stay within {limit}")

    def get(self, timeout: float) -> tuple[str, bytes] | None:
        """The oldest message, waiting up to ``timeout`` seconds for one; None if none came."""
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                while self._all and self._all[0][1] is None:
                    self._all.popleft()
                    self._dead -= 1
                if self._all:
                    entry = self._all.popleft()
                    self._take(entry)
                    return entry[0], entry[1]
                remaining = end - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(remaining)


class CredentialsError(TransportError):
    """A password file or TLS file named for the connection is missing or unreadable: a setup mistake,
    not a broker that is down."""


class AddressError(TransportError):
    """A broker URL or connection setting that cannot work (scheme, port, ...): a setup mistake, not a
    broker that is down."""


def connect(
    url: str,
    client_id: str,
    *,
    username: str | None = None,
    password_file: str | os.PathLike[str] | None = None,
    ca: str | os.PathLike[str] | None = None,
    cert: str | os.PathLike[str] | None = None,
    key: str | os.PathLike[str] | None = None,
    max_outage: float | None = None,
    **kw: Any,
) -> MqttTransport:
    """An :class:`MqttTransport` from the credentials a command line or config file names: a password
    file (its first line), TLS files. Every failure a user can cause is a ``TransportError`` with one
    readable line: a bad URL, an unreadable file (``CredentialsError``), an unreachable or refusing broker.
    ``max_outage``: seconds of broker outage a publish waits through (``None``: forever; see MqttTransport)."""
    try:
        password = Path(password_file).read_text().strip() if password_file is not None else None
    except OSError as e:
        raise CredentialsError(f"cannot read the password file {password_file}: {e.strerror}") from None
    for label, path in (("CA certificate", ca), ("client certificate", cert), ("client key", key)):
        if path is not None and not Path(path).is_file():
            raise CredentialsError(f"the {label} {path} does not exist")
    tls = TlsConfig(str(ca), str(cert) if cert else None, str(key) if key else None) if ca else None
    try:
        return MqttTransport(url, client_id, username=username, password=password, tls=tls, max_outage=max_outage, **kw)
    except ValueError as e:
        raise AddressError(str(e)) from None

