"""The authentication service: unsigned JWT-shaped access tokens and single-use refresh tokens."""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from tcbridge.simulator.faults import Faults


@dataclass(frozen=True, slots=True)
class _Access:
    expires_at: float
    epoch: int


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def make_jwt(subject: str, issued_at: float, expires_at: float) -> str:
    """An unsigned ``header.payload.sig`` token whose payload carries ``exp`` in epoch seconds."""
    header = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    claims = {"sub": subject, "iat": int(issued_at), "exp": int(expires_at),
              "jti": secrets.token_hex(8)}
    payload = _b64(json.dumps(claims).encode())
    return f"{header}.{payload}.{_b64(secrets.token_bytes(16))}"


class TokenStore:
    """Issues, refreshes, checks and revokes tokens against an injectable clock."""

    def __init__(
        self, *, clock: Callable[[], float], access_ttl_s: float, refresh_ttl_s: float,
        faults: Faults,
    ) -> None:
        self._clock = clock
        self._access_ttl_s = access_ttl_s
        self._refresh_ttl_s = refresh_ttl_s
        self._faults = faults
        self._access: dict[str, _Access] = {}
        self._refresh: dict[str, tuple[float, str]] = {}  # token -> (expires_at, access token)

    def issue(self, subject: str) -> tuple[str, str]:
        """A fresh (access, refresh) pair."""
        self._prune()
        now = self._clock()
        access = make_jwt(subject, now, now + self._access_ttl_s)
        self._access[access] = _Access(now + self._access_ttl_s, self._faults.token_epoch)
        refresh = secrets.token_urlsafe(32)
        self._refresh[refresh] = (now + self._refresh_ttl_s, access)
        return access, refresh

    def refresh(self, token: str, subject: str) -> tuple[str, str] | None:
        """Spend a refresh token for a new pair; None if unknown, used or expired."""
        entry = self._refresh.pop(token, None)
        if entry is None or entry[0] <= self._clock():
            return None
        return self.issue(subject)

    def logout(self, token: str) -> bool:
        """Revoke a refresh token and the access token issued with it; False if unknown."""
        entry = self._refresh.pop(token, None)
        if entry is None:
            return False
        self._access.pop(entry[1], None)
        return True

    def access_valid(self, token: str) -> bool:
        """True if the access token was issued, is unexpired and survived expire_tokens_now()."""
        entry = self._access.get(token)
        return (entry is not None and entry.expires_at > self._clock()
                and entry.epoch == self._faults.token_epoch)

    def _prune(self) -> None:
        now = self._clock()
        self._access = {t: a for t, a in self._access.items() if a.expires_at > now}
        self._refresh = {t: r for t, r in self._refresh.items() if r[0] > now}
