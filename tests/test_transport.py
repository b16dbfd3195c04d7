"""BrokerConfig from URLs and the environment; MQTT topic matching (no broker needed)."""

from __future__ import annotations

import pytest

from fedmqtt.errors import ConfigError
from fedmqtt.transport import BrokerConfig, topic_matches


def test_url_and_environment() -> None:
    env = {"FEDMQTT_USERNAME": "edge-1", "FEDMQTT_PASSWORD": "s3cret", "FEDMQTT_CA_FILE": "/etc/ca.crt"}
    cfg = BrokerConfig.from_url("mqtts://broker.example:8884", env=env)
    assert (cfg.host, cfg.port, cfg.tls) == ("broker.example", 8884, True)
    assert (cfg.username, cfg.password, cfg.ca_file) == ("edge-1", "s3cret", "/etc/ca.crt")
    assert "s3cret" not in repr(cfg)
    assert BrokerConfig.from_url("mqtt://h", env={}).port == 1883
    assert BrokerConfig.from_url("mqtts://h", env={}).port == 8883


@pytest.mark.parametrize("url", ["http://h:1883", "mqtt://", "mqtt://h:notaport", "mqtt://user:pw@h:1883"])
def test_bad_urls_are_refused(url: str) -> None:
    with pytest.raises(ConfigError):
        BrokerConfig.from_url(url, env={})


@pytest.mark.parametrize(
    ("pattern", "topic", "expected"),
    [("a/+/c", "a/b/c", True), ("a/+/c", "a/b/d", False), ("a/#", "a/b/c", True), ("a/+", "a/b/c", False),
     ("fedmqtt/f/updates/+", "fedmqtt/f/updates/x", True), ("a/b", "a/b", True)],
)
def test_topic_matching(pattern: str, topic: str, expected: bool) -> None:
    assert topic_matches(pattern, topic) is expected
