"""Webhook credential and source-address checks."""

from __future__ import annotations

import base64

import pytest

from tcbridge import auth
from tcbridge.config import WebhookSettings
from tests.conftest import basic_header

BEARER = WebhookSettings(auth="bearer", bearer_token="s3cret-0123456789abcdef0123456789ab")
BASIC = WebhookSettings(auth="basic", basic_username="tc", basic_password="pw:with:colons")


@pytest.mark.parametrize(
    ("settings", "header", "ok"),
    [
        (BEARER, "Bearer s3cret-0123456789abcdef0123456789ab", True),
        (BEARER, "bearer s3cret-0123456789abcdef0123456789ab", True),
        (BEARER, "Bearer s3cret-0123456789abcdef0123456789ab2", False),
        (BEARER, "Bearer ", False),
        (BEARER, None, False),
        (BEARER, basic_header("tc", "s3cret-0123456789abcdef0123456789ab"), False),
        (BASIC, basic_header("tc", "pw:with:colons"), True),
        (BASIC, basic_header("tc", "wrong"), False),
        (BASIC, basic_header("other", "pw:with:colons"), False),
        (BASIC, "Basic not-base64!!", False),
        (BASIC, "Basic " + base64.b64encode(b"\xff\xfe").decode(), False),
        (BASIC, "Basic " + base64.b64encode(b"no-colon").decode(), False),
        (BASIC, "Bearer pw:with:colons", False),
        (WebhookSettings(auth="none", allow_unauthenticated=True), None, True),
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


def test_ipv4_mapped_addresses_match_ipv4_entries() -> None:
    # A dual-stack listener ("::") reports IPv4 peers as ::ffff:a.b.c.d.
    allowed = auth.parse_networks(["35.204.224.107", "10.0.0.0/8"])
    assert auth.ip_allowed("::ffff:35.204.224.107", allowed)
    assert auth.ip_allowed("::ffff:10.9.8.7", allowed)
    assert not auth.ip_allowed("::ffff:35.204.224.108", allowed)
    proxies = auth.parse_networks(["127.0.0.1"])
    assert auth.client_ip("::ffff:127.0.0.1", ["35.204.224.107"], proxies) == "35.204.224.107"


def test_forwarded_for_is_used_only_behind_a_trusted_proxy() -> None:
    proxies = auth.parse_networks(["127.0.0.1"])
    xff = ["6.6.6.6, 35.204.224.107"]
    assert auth.client_ip("127.0.0.1", xff, proxies) == "35.204.224.107"
    assert auth.client_ip("9.9.9.9", xff, proxies) == "9.9.9.9"
    assert auth.client_ip("127.0.0.1", [], proxies) == "127.0.0.1"
    assert auth.client_ip("127.0.0.1", xff, ()) == "127.0.0.1"
    assert auth.client_ip("127.0.0.1", ["127.0.0.1"], proxies) == "127.0.0.1"


def test_forwarded_for_headers_are_read_together_from_the_right() -> None:
    # The client sends its own header naming an allowed address; the proxy adds a second
    # header with the address it saw. Only the proxy's hop may decide.
    proxies = auth.parse_networks(["127.0.0.1"])
    spoofed = ["35.204.224.107", "6.6.6.6"]
    assert auth.client_ip("127.0.0.1", spoofed, proxies) == "6.6.6.6"
    assert auth.client_ip("127.0.0.1", ["35.204.224.107, 6.6.6.6", "127.0.0.1"], proxies) \
        == "6.6.6.6"
    assert auth.client_ip("127.0.0.1", ["garbage", ""], proxies) == "garbage"


def test_non_ascii_authorization_is_refused_not_an_error() -> None:
    # aiohttp hands header bytes that are not UTF-8 over as lone surrogates.
    weird = b"Bearer \xff\xfe".decode("utf-8", "surrogateescape")
    assert not auth.check_credentials(BEARER, weird)
    assert not auth.check_credentials(BASIC, "Basic " + "\u00e9t\u00e9")
    assert not auth.check_credentials(BASIC, b"Basic \xff".decode("utf-8", "surrogateescape"))
