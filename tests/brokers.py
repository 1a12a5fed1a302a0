"""Pytest helpers: private MQTT brokers on free loopback ports, stopped after each test.

Import the fixtures into a test module (or conftest.py) and ask for them by name::

    from brokers import amqtt_broker, mosquitto_broker, mosquitto_factory  # noqa: F401

    def test_x(mosquitto_broker):            # a Broker: .url .port .host .log_path .stop() .restart()
        t = MqttTransport(mosquitto_broker.url, "me")

    def test_acl(mosquitto_factory):         # mosquittos with your own extra config lines
        broker = mosquitto_factory("password_file /x/passwd\nacl_file /x/acl\n")

The mosquitto fixtures skip (with the reason) where mosquitto is not installed; ``amqtt_broker`` always
runs. The generated config (``protocols/broker.py``) listens on 127.0.0.1 only, allows anonymous
clients, sets ``max_queued_messages 0``, ``max_packet_size 1048576``, ``persistence false`` and, as
root, ``user root``; extra config is appended (``allow_anonymous false`` there turns anonymity off again,
as mosquitto takes the last value of a setting).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from protocols.broker import Broker, mosquitto_path, start_broker

MOSQUITTO = mosquitto_path()
MOSQUITTO_PUB = shutil.which("mosquitto_pub")
MOSQUITTO_SUB = shutil.which("mosquitto_sub")
SKIP_REASON = "mosquitto is not installed (apt-get install -y mosquitto mosquitto-clients)"

requires_mosquitto = pytest.mark.skipif(MOSQUITTO is None, reason=SKIP_REASON)
requires_mosquitto_clients = pytest.mark.skipif(
    MOSQUITTO_PUB is None or MOSQUITTO_SUB is None,
    reason="mosquitto_pub/mosquitto_sub are not installed (apt-get install -y mosquitto-clients)",
)


@pytest.fixture
def mosquitto_factory(tmp_path: Path) -> Iterator[Callable[..., Broker]]:
    """``factory(extra_config="", port=None) -> Broker``: as many mosquittos as a test needs."""
    if MOSQUITTO is None:
        pytest.skip(SKIP_REASON)
    started: list[Broker] = []

    def factory(extra_config: str = "", port: int | None = None) -> Broker:
        workdir = tmp_path / f"mosquitto-{len(started)}"
        broker = start_broker("mosquitto", port=port, extra_config=extra_config, workdir=workdir)
        started.append(broker)
        return broker

    yield factory
    for broker in started:
        broker.stop()


@pytest.fixture
def mosquitto_broker(mosquitto_factory: Callable[..., Broker]) -> Broker:
    """A mosquitto with the generated config, on a free loopback port (skips where not installed)."""
    return mosquitto_factory()


@pytest.fixture
def amqtt_broker() -> Iterator[Broker]:
    """The embedded pure-Python amqtt broker (MQTT 3.1.1; its ``url`` says ``?protocol=3.1.1``)."""
    broker = start_broker("amqtt")
    yield broker
    broker.stop()
