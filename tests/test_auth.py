"""Webhook credential and source-address checks."""

from __future__ import annotations

import base64

import pytest

from tcbridge import auth
from tcbridge.config import WebhookSettings
from tests.conftest import basic_header

BEARER = WebhookSettings(auth="bearer", bearer_token="s3cret")
BASIC = WebhookSettings(auth="basic", basic_username="tc", basic_password="pw:with:colons")


@pytest.mark.parametrize(
    ("settings", "header", "ok"),
    [
        (BEARER, "Bearer s3cret", True),
        (BEARER, "bearer s3cret", True),
        (BEARER, "Bearer s3cret2", False),
        (BEARER, "Bearer ", False),
        (BEARER, None, False),
        (BEARER, basic_header("tc", "s3cret"), False),
        (BASIC, basic_header("tc", "pw:with:colons"), True),
        (BASIC, basic_header("tc", "wrong"), False),
        (BASIC, basic_header("other", "pw:with:colons"), False),
        (BASIC, "Basic not-base64!!", False),
        (BASIC, "Basic " + base64.b64encode(b"\xff\xfe").decode(), False),
        (BASIC, "Basic " + base64.b64encode(b"no-colon").decode(), False),
        (BASIC, "Bearer pw:with:colons", False),
        (WebhookSettings(auth="none"), None, True),
    ],
)
def test_check_credentials(settings: WebhookSettings, header: str | None, ok: bool) -> None:
    assert auth.check_credentials(settings, header) is ok


def test_challenge_names_the_scheme() -> None:
    assert auth.challenge(BASIC).startswith("Basic realm=")
    assert auth.challenge(BEARER).startswith("Bearer realm=")


def test_allow_list() -> None:
    allowed = auth.parse_networks(["35.204.224.107", "10.0.0.0/8", "::1"])
    assert auth.ip_allowed("35.204.224.107", allowed)
    assert auth.ip_allowed("10.2.3.4", allowed)
    assert auth.ip_allowed("::1", allowed)
    assert not auth.ip_allowed("35.204.224.108", allowed)
    assert not auth.ip_allowed(None, allowed)
    assert not auth.ip_allowed("not-an-ip", allowed)
    assert auth.ip_allowed("1.2.3.4", ())


def test_forwarded_for_is_used_only_behind_a_trusted_proxy() -> None:
    proxies = auth.parse_networks(["127.0.0.1"])
    xff = "6.6.6.6, 35.204.224.107"
    assert auth.client_ip("127.0.0.1", xff, proxies) == "35.204.224.107"
    assert auth.client_ip("9.9.9.9", xff, proxies) == "9.9.9.9"
    assert auth.client_ip("127.0.0.1", None, proxies) == "127.0.0.1"
    assert auth.client_ip("127.0.0.1", xff, ()) == "127.0.0.1"
    assert auth.client_ip("127.0.0.1", "127.0.0.1", proxies) == "127.0.0.1"
