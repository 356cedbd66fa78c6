"""Checking who calls the webhook: pure functions, no IO."""

from __future__ import annotations

import base64
import hmac
import ipaddress
from collections.abc import Sequence

from tcbridge.config import WebhookSettings

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def check_credentials(settings: WebhookSettings, authorization: str | None) -> bool:
    """True when the ``Authorization`` header matches the configured scheme (constant time)."""
    if settings.auth == "none":
        return True
    if settings.auth is None or not authorization:  # no scheme configured: fail closed
        return False
    scheme, _, value = authorization.strip().partition(" ")
    value = value.strip()
    if settings.auth == "bearer":
        token = settings.bearer_token
        return (
            scheme.lower() == "bearer"
            and token is not None
            and _same(value, token.get_secret_value())
        )
    return scheme.lower() == "basic" and _check_basic(settings, value)


def _check_basic(settings: WebhookSettings, value: str) -> bool:
    try:
        decoded = base64.b64decode(value, validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):  # b64decode raises ValueError for non-ASCII
        return False
    user, sep, password = decoded.partition(":")
    if not sep or settings.basic_username is None or settings.basic_password is None:
        return False
    # Evaluate both comparisons, so timing does not tell which one failed.
    user_ok = _same(user, settings.basic_username.get_secret_value())
    password_ok = _same(password, settings.basic_password.get_secret_value())
    return user_ok and password_ok


def _same(given: str, expected: str) -> bool:
    # aiohttp decodes header bytes that are not UTF-8 as lone surrogates; such a value is
    # not any configured secret (surrogateescape gives the raw bytes back to compare).
    return hmac.compare_digest(
        given.encode("utf-8", "surrogateescape"), expected.encode("utf-8", "surrogateescape")
    )


def challenge(settings: WebhookSettings) -> str:
    """The ``WWW-Authenticate`` header value for a 401."""
    if settings.auth == "basic":
        return 'Basic realm="tcbridge", charset="UTF-8"'
    return 'Bearer realm="tcbridge"'


def parse_networks(values: Sequence[str]) -> tuple[Network, ...]:
    """Parse an allow-list of addresses and CIDR networks (validated in config)."""
    return tuple(ipaddress.ip_network(value, strict=False) for value in values)


def client_ip(
    peer: str | None, forwarded_for: Sequence[str], trusted_proxies: Sequence[Network]
) -> str | None:
    """The caller's address: the peer, or the last untrusted hop of X-Forwarded-For
    when the peer is a trusted proxy.

    ``forwarded_for`` is every X-Forwarded-For header in order: several headers are one
    list joined by commas (RFC 9110 5.3), and a proxy that adds its own header after the
    client's puts the real hop at the right, so reading only the first would let the
    client name itself (nginx realip and MDN read it the same way, from the right)."""
    if peer is None or not trusted_proxies or not _in(peer, trusted_proxies):
        return peer
    hops = [hop.strip() for hop in ",".join(forwarded_for).split(",") if hop.strip()]
    for hop in reversed(hops):
        if not _in(hop, trusted_proxies):
            return hop
    return hops[0] if hops else peer


def ip_allowed(ip: str | None, allowed: Sequence[Network]) -> bool:
    """True when no allow-list is set or the address is on it."""
    if not allowed:
        return True
    return ip is not None and _in(ip, allowed)


def _in(ip: str, networks: Sequence[Network]) -> bool:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    # A listener on "::" sees IPv4 callers as ::ffff:a.b.c.d: compare them as the IPv4
    # address, or an allow-list of Tradecloud's IPv4 addresses would refuse them (a 403,
    # which Tradecloud never retries).
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)
