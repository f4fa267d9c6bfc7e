"""The one parser of addresses in settings (ipop_switch/hostport.py): every form it takes,
every mistake it refuses, and the settings that use it saying so at the field."""

from __future__ import annotations

import pytest

from ipop_switch import hostport
from ipop_switch.config import ConfigError, IceConfig, NodeConfig
from ipop_switch.signaling.config import SignalingConfig


@pytest.mark.parametrize("text, want", [
    ("turn.example", ("turn.example", 3478)),
    ("turn.example:3479", ("turn.example", 3479)),
    ("198.18.0.2", ("198.18.0.2", 3478)),
    ("198.18.0.2:1", ("198.18.0.2", 1)),
    ("[fd00::2]:65535", ("fd00::2", 65535)),
    ("[fd00::2]", ("fd00::2", 3478)),
    ("fd00::2", ("fd00::2", 3478)),             # a bare IPv6 literal: its last group is no port
])
def test_forms(text, want):
    assert hostport.split(text, 3478) == want


@pytest.mark.parametrize("text, words", [
    ("h:0", "bad port"), ("h:65536", "bad port"), ("h:x", "bad port"), ("h:", "bad port"),
    (":3478", "no host"), ("", "no host"), ("[]:5", "no host"),
    ("[fd00::2", "use \\[v6\\]:port"), ("[fd00::2]x", "use \\[v6\\]:port"), ("[fd00::2]:", "bad port"),
])
def test_mistakes_are_refused_naming_the_text(text, words):
    with pytest.raises(ValueError, match=words):
        hostport.split(text, 3478)


def test_ip_literals_only_where_asked():
    assert hostport.split("[fd00::53]:5353", 53, ip=True) == ("fd00::53", 5353)
    assert hostport.split("198.18.0.53", 53, ip=True) == ("198.18.0.53", 53)
    with pytest.raises(ValueError, match="dns.google"):
        hostport.split("dns.google", 53, ip=True)


def test_every_setting_takes_the_same_forms_and_names_its_field():
    assert IceConfig.parse({"stun": "[fd00::2]:3479"}).stun_addr() == ("fd00::2", 3479)
    with pytest.raises(ConfigError, match=r"stun: bad address ':3478': no host"):
        IceConfig.parse({"stun": ":3478"})
    with pytest.raises(ConfigError, match="web.listen: bad port"):
        NodeConfig.parse({"web": {"listen": "127.0.0.1:0"}})
    s = SignalingConfig(jid="a@x.test", password="p", servers=["[fd00::1]:5223", "x.test"])
    assert s.endpoints() == [("fd00::1", 5223), ("x.test", 5222)]
    with pytest.raises(ValueError, match="no host"):
        SignalingConfig(jid="a@x.test", password="p", servers=[":5222"])
