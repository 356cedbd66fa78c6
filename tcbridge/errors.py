"""The one exception tree of tcbridge, rooted at :class:`TcbridgeError`."""

from __future__ import annotations


def describe(error: BaseException) -> str:
    """``Type: message`` for logs and kept errors, even for an exception whose ``str()``
    itself raises."""
    try:
        message = str(error)
    except Exception:
        message = "<unprintable>"
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


class TcbridgeError(Exception):
    """Base of every error tcbridge raises on purpose."""


class ConfigError(TcbridgeError):
    """The configuration is invalid; the message names the key and the file."""


class InvalidEvent(TcbridgeError):
    """A payload is not a Tradecloud event or object we can store (a 400 for a webhook)."""


class AuthError(TcbridgeError):
    """A webhook request failed authentication."""


class UnknownName(TcbridgeError):
    """A name given on the command line (an event id, a handler) that does not exist."""
class TokenRejected(AuthError):
    """An OAuth 2.0 bearer token is bad, expired or not for us (a 401); ``reason`` is a short
    label for the metric. Messages never contain the token."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class KeySetUnavailable(TcbridgeError):
    """The identity provider's key set cannot be had now, so a token cannot be judged: a 503
    with ``Retry-After`` (a 401 would lose the event: Tradecloud never retries a 4xx)."""

    def __init__(self, message: str, *, retry_after_s: int = 5) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class StoreError(TcbridgeError):
    """The store failed."""


class StoreUnavailable(StoreError):
    """The store cannot commit right now; the caller should answer 503 and be retried."""


class Fenced(StoreError):
    """A poller page was refused: another replica took the poller over since this one's
    lease (its fencing epoch) was granted. Nothing of the page was committed."""


class ApiError(TcbridgeError):
    """A call to the Tradecloud API failed.

    Messages never contain credentials or tokens.
    """

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ApiTransientError(ApiError):
    """A failure worth retrying later: 5xx, 429, timeout, connection error."""

    def __init__(
        self, message: str, *, status: int | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message, status=status)
        self.retry_after_s = retry_after_s


class ApiAuthError(ApiError):
    """Tradecloud refused our credentials (401/403 even after a fresh login)."""


class ApiPermanentError(ApiError):
    """A failure that retrying will not fix: another 4xx, or a response we cannot read."""


class HandlerError(TcbridgeError):
    """A handler failed to deliver; the delivery is retried."""


class PermanentError(HandlerError):
    """A handler failure that retrying cannot fix; the delivery goes dead at once.

    Python handlers raise this to say so.
    """


class DocumentNotFetched(TcbridgeError):
    """A document tcbridge will not fetch: its ``url`` is not http(s) or points (or
    redirects) outside ``documents_allowed_hosts``, or its ``objectId`` is no id ("..",
    control characters). It is listed in the envelope, not
    downloaded, and the delivery goes on."""
