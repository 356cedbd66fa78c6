"""Delivery handlers: hand one stored event to the ERP side and say how it went.

The dispatcher calls :meth:`Handler.deliver` once per attempt. A handler never raises for a
failed delivery: it returns an :class:`Outcome` (``retry`` or ``dead``) and the dispatcher
records it. Only :class:`asyncio.CancelledError` (shutdown) propagates.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import contextvars
import hashlib
import importlib
import inspect
import json
import os
import re
import signal
import string
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

import aiohttp
import structlog
from multidict import CIMultiDict
from yarl import URL

from tcbridge.config import (
    WRITER_VARIABLES,
    AmqpHandlerSettings,
    CommandHandlerSettings,
    FileHandlerSettings,
    HandlerSettings,
    HttpHandlerSettings,
    NatsHandlerSettings,
    PythonHandlerSettings,
    child_environ,
)
from tcbridge.envelope import MAX_ID_LENGTH
from tcbridge.errors import ConfigError, PermanentError, describe
from tcbridge.files import TEMP_RANDOM_HEX, remove_stale_temp_files
from tcbridge.filewriter import FolderWriter, WriteFailed
from tcbridge.timefmt import retry_after_s

log = structlog.get_logger(__name__)

T = TypeVar("T")
OutcomeStatus = Literal["done", "retry", "dead"]
OUTPUT_TAIL_BYTES = 4096
MAX_ERROR_CHARS = 500
REAP_TIMEOUT_S = 5.0
FILE_CLOSE_TIMEOUT_S = 1.0  # after the drain, a write still running is a hung one
FILENAME_FIELDS = ("id", "kind", "entityId", "lastUpdatedAt", "eventName")
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]")
_LEADING_DOTS = re.compile(r"^\.+")
# write_atomically's temp file is ".<name>.<12 hex>.tmp" and must fit NAME_MAX (255 bytes on
# every common Linux file system) as well.
MAX_FILENAME_BYTES = 255 - len("..tmp.") - TEMP_RANDOM_HEX
SHORT_VALUE_PREFIX = 40
# The longest values a stored event can give a file name: what a template must fit.
_LONGEST_ENVELOPE = {"id": "x" * 32, "kind": "order_documents", "entityId": "x" * MAX_ID_LENGTH,
                     "lastUpdatedAt": "2024-05-01T10:00:00.000000000+00:00",
                     "eventName": "x" * MAX_ID_LENGTH}


@dataclass(frozen=True, slots=True)
class Outcome:
    """The result of one delivery attempt."""

    status: OutcomeStatus
    error: str | None = None  # short human message for retry/dead
    retry_after_s: float | None = None  # a server-requested delay (HTTP Retry-After)
    output: str | None = None  # command: tail of stdout+stderr


DONE = Outcome("done")


class Handler(Protocol):
    """Delivers envelopes to one destination."""

    name: str

    async def deliver(self, envelope: Mapping[str, Any], body: bytes, attempt: int) -> Outcome:
        """Deliver one envelope; ``body`` is its JSON serialisation, ``attempt`` starts at 1."""
        ...

    async def close(self) -> None:
        """Release what the handler holds."""
        ...


def build_handler(
    settings: HandlerSettings, session: aiohttp.ClientSession, *, secrets: Sequence[str] = ()
) -> Handler:
    """The handler for one ``[[handlers]]`` section; :class:`ConfigError` if it cannot work.
    ``secrets`` (every secret of the settings) are redacted from output that is kept."""
    if isinstance(settings, FileHandlerSettings):
        return FileHandler(settings)
    if isinstance(settings, CommandHandlerSettings):
        return CommandHandler(settings, secrets)
    if isinstance(settings, HttpHandlerSettings):
        return HttpHandler(settings, session)
    if isinstance(settings, AmqpHandlerSettings | NatsHandlerSettings):
        # Imported here: sinks builds on this module (Outcome), and the broker clients load
        # only when a broker handler is configured.
        from tcbridge.sinks import build_sink

        return build_sink(settings)
    return PythonHandler(settings, secrets)


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."



def _timeout_error(timeout_s: float) -> Outcome:
    return Outcome("retry", error=f"timeout after {timeout_s:g} s")


# --- file -------------------------------------------------------------------------------------


class FileHandler:
    """Writes each envelope atomically into a drop folder, through a writer process of its
    own that takes the files of concurrent deliveries as one batch, with one fsync of the
    folder (:class:`tcbridge.files.FolderWriter`)."""

    def __init__(self, settings: FileHandlerSettings,
                 writer_argv: Sequence[str] | None = None) -> None:
        self.name = settings.name
        self._settings = settings
        _check_filename_template(settings.name, settings.filename)
        removed = remove_stale_temp_files(settings.directory)
        if removed:
            log.warning("handler.stale_temp_files_removed", handler=self.name, files=removed,
                        directory=str(settings.directory))
        # Not the daemon's environment, which may hold secrets (TCBRIDGE_*): the child
        # needs none of them.
        self._writer = FolderWriter(settings.directory, name=settings.name,
                                    hung_after_s=settings.timeout_s, argv=writer_argv,
                                    env=child_environ(WRITER_VARIABLES))

    async def deliver(self, envelope: Mapping[str, Any], body: bytes, attempt: int) -> Outcome:
        """Write ``body`` to ``directory/filename``; done only once the rename is durable,
        an OS error is retried."""
        name = render_filename(self._settings.filename, envelope)
        try:
            async with asyncio.timeout(self._settings.timeout_s):
                await self._writer.write(name, body)
        except TimeoutError:
            return _timeout_error(self._settings.timeout_s)
        except WriteFailed as e:
            return Outcome("retry", error=_short(str(e)))
        return DONE

    async def close(self) -> None:
        """End the writer process; a write still hung is abandoned (and logged)."""
        await self._writer.close(FILE_CLOSE_TIMEOUT_S)


def _check_filename_template(handler: str, template: str) -> None:
    """Reject templates that are malformed, use unknown fields, or are not a plain name."""
    where = f"handlers.{handler}.filename"
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ConfigError(f"{where}: malformed template {template!r}: {e}") from e
    for _, field, spec, conversion in parts:
        if field is None:
            continue
        if field not in FILENAME_FIELDS or spec or conversion:
            allowed = ", ".join("{" + f + "}" for f in FILENAME_FIELDS)
            raise ConfigError(f"{where}: unknown placeholder in {template!r}; use {allowed}")
    sample = render_filename(template, {})
    if not sample or sample.startswith(".") or any(c in sample for c in "/\\\0"):
        raise ConfigError(f"{where}: {template!r} must give a plain, non-hidden file name")
    if len(render_filename(template, _LONGEST_ENVELOPE).encode()) > MAX_FILENAME_BYTES:
        raise ConfigError(f"{where}: {template!r} can give names over {MAX_FILENAME_BYTES} bytes")


def render_filename(template: str, envelope: Mapping[str, Any]) -> str:
    """The file name for an envelope; every substituted value is made path-safe, and the
    longest ones shortened (with a digest) until the name fits the file system's limit."""
    values = {field: _safe_value(envelope.get(field)) for field in FILENAME_FIELDS}
    if envelope.get("eventName") is None:
        values["eventName"] = "snapshot"
    name = template.format_map(values)
    while len(name.encode()) > MAX_FILENAME_BYTES:
        field = max(values, key=lambda f: len(values[f]))
        if len(values[field]) <= SHORT_VALUE_PREFIX + 17:
            break  # the template itself is too long; refused when the handler is built
        values[field] = _shortened(values[field], envelope.get(field))
        name = template.format_map(values)
    return name


def _shortened(safe: str, original: object) -> str:
    """A readable prefix and a digest of the whole value, so two long ids that share a
    prefix still give different names (the same id always the same name)."""
    digest = hashlib.sha256(str(original).encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{safe[:SHORT_VALUE_PREFIX]}_{digest}"


def _safe_value(value: object) -> str:
    text = "none" if value is None else str(value)
    text = _UNSAFE_CHARS.sub("_", text)
    # Leading dots would make ".", ".." or a hidden file that importers (and we) skip.
    text = _LEADING_DOTS.sub(lambda m: "_" * len(m.group()), text)
    return text or "_"


# --- command ----------------------------------------------------------------------------------


class _Tail:
    """Keeps only the last ``limit`` bytes of a stream, with known secrets redacted.

    It holds ``margin`` bytes more than it shows, so that a secret cut by the start of the
    shown tail is still whole when redaction runs. Once bytes were dropped, the first kept
    ones may be the end of a secret cut in two: they are never shown, even when redactions
    shorten the text so much that the shown tail would reach back to them."""

    def __init__(
        self, limit: int = OUTPUT_TAIL_BYTES, secrets: Sequence[str] = ()
    ) -> None:
        self._limit = limit
        encoded = sorted((s.encode() for s in secrets if s), key=len, reverse=True)
        # One pass, longest first: a secret that contains another is redacted whole.
        self._pattern = re.compile(b"|".join(map(re.escape, encoded))) if encoded else None
        longest = len(encoded[0]) if encoded else 0
        self._keep = limit + longest
        self._unsafe = max(longest - 1, 0)  # a cut secret has at most this many bytes left
        self._dropped = False
        self._data = bytearray()

    def feed(self, chunk: bytes) -> None:
        self._data += chunk
        if len(self._data) > self._keep:
            del self._data[: len(self._data) - self._keep]
            self._dropped = True

    def text(self) -> str:
        data = bytes(self._data)
        start = self._unsafe if self._dropped else 0
        out = bytearray()
        pos = 0
        for match in self._pattern.finditer(data) if self._pattern is not None else ():
            out += data[max(pos, start):match.start()]
            out += b"***"
            pos = match.end()
        out += data[max(pos, start):]
        return bytes(out[-self._limit:]).decode("utf-8", errors="replace")


class CommandHandler:
    """Runs a program (no shell) in its own process group with the envelope on stdin."""

    def __init__(self, settings: CommandHandlerSettings, secrets: Sequence[str] = ()) -> None:
        self.name = settings.name
        self._settings = settings
        self._permanent = frozenset(settings.permanent_exit_codes)
        self._secrets = tuple(secrets)

    async def deliver(self, envelope: Mapping[str, Any], body: bytes, attempt: int) -> Outcome:
        """Run the command once; its exit code decides the outcome."""
        program = self._settings.command[0]
        try:
            proc = await asyncio.create_subprocess_exec(
                *self._settings.command,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,  # its own process group, so a timeout kills it all
                cwd=self._settings.cwd,
                env=self._environment(envelope, attempt),
            )
        except (OSError, ValueError) as e:
            # Retried, not dead: a deploy may install the program (or fix its mode) later.
            return Outcome("retry", error=_short(f"cannot start {program!r}: {describe(e)}"))
        return await self._supervise(proc, body)

    async def close(self) -> None:
        """Nothing to release: running commands end with their (cancelled) delivery."""

    def _environment(self, envelope: Mapping[str, Any], attempt: int) -> dict[str, str]:
        event_name = envelope.get("eventName")
        # Not os.environ: the daemon's may hold secrets (TCBRIDGE_*), which the program
        # would see and could print into the kept output.
        return {
            **child_environ(self._settings.inherit_env),
            **self._settings.env,
            "TCBRIDGE_EVENT_ID": str(envelope.get("id", "")),
            "TCBRIDGE_KIND": str(envelope.get("kind", "")),
            "TCBRIDGE_ENTITY_ID": str(envelope.get("entityId", "")),
            "TCBRIDGE_EVENT_NAME": "" if event_name is None else str(event_name),
            "TCBRIDGE_ATTEMPT": str(attempt),
        }

    async def _supervise(self, proc: asyncio.subprocess.Process, body: bytes) -> Outcome:
        tail = _Tail(secrets=self._secrets)
        timeout_s = self._settings.timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.gather(_feed_stdin(proc, body), _drain_output(proc, tail))
                returncode = await proc.wait()
        except TimeoutError:
            await _kill_group(proc, self.name, "timeout")
            return Outcome("retry", error=f"timeout after {timeout_s:g} s", output=tail.text())
        except asyncio.CancelledError:
            await _kill_group(proc, self.name, "cancelled")
            raise
        return self._judge(returncode, tail.text())

    def _judge(self, returncode: int, output: str) -> Outcome:
        if returncode == 0:
            return Outcome("done", output=output)
        if returncode < 0:
            error = f"killed by signal {_signal_name(-returncode)}"
            return Outcome("retry", error=error, output=output)
        if returncode in self._permanent:
            return Outcome("dead", error=f"exit code {returncode} (permanent)", output=output)
        return Outcome("retry", error=f"exit code {returncode}", output=output)


async def _feed_stdin(proc: asyncio.subprocess.Process, body: bytes) -> None:
    stdin = proc.stdin
    assert stdin is not None
    try:
        stdin.write(body)
        await stdin.drain()
    except (BrokenPipeError, ConnectionResetError):
        pass  # the program does not read stdin; its exit code still decides
    finally:
        stdin.close()


async def _drain_output(proc: asyncio.subprocess.Process, tail: _Tail) -> None:
    stdout = proc.stdout
    assert stdout is not None
    while chunk := await stdout.read(65536):
        tail.feed(chunk)


async def _kill_group(proc: asyncio.subprocess.Process, handler: str, reason: str) -> None:
    """SIGKILL the whole process group, then reap the leader (bounded)."""
    log.warning("handler.command_killed", handler=handler, pid=proc.pid, reason=reason)
    with contextlib.suppress(ProcessLookupError):  # the group is already gone
        os.killpg(proc.pid, signal.SIGKILL)
    try:
        # wait() also waits for the pipes; a process that left the group may still hold them.
        async with asyncio.timeout(REAP_TIMEOUT_S):
            await proc.wait()
    except TimeoutError:
        log.warning("handler.command_unreaped", handler=handler, pid=proc.pid)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


# --- http -------------------------------------------------------------------------------------


class HttpHandler:
    """POSTs each envelope to an internal endpoint over the shared session."""

    RETRY_STATUSES = frozenset({408, 429})
    RETRY_AFTER_STATUSES = frozenset({429, 503})

    def __init__(self, settings: HttpHandlerSettings, session: aiohttp.ClientSession) -> None:
        self.name = settings.name
        self._settings = settings
        self._session = session
        self._url = _check_url(settings.name, settings.url)
        credentials = _credentials(settings)
        if credentials is not None and (self._url.raw_user or self._url.raw_password):
            raise ConfigError(f"handlers.{settings.name}: credentials in the url and in auth")
        self._headers = _base_headers(settings, credentials)
        self._secrets = _secrets_of(settings, self._url, credentials)

    async def deliver(self, envelope: Mapping[str, Any], body: bytes, attempt: int) -> Outcome:
        """POST ``body``; the status code decides the outcome."""
        headers = CIMultiDict(self._headers)
        headers["Idempotency-Key"] = str(envelope.get("id", ""))
        timeout_s = self._settings.timeout_s
        try:
            async with self._session.post(
                self._url,
                data=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout_s),
                allow_redirects=False,  # a redirected POST may turn into a GET without a body
            ) as response:
                return await self._judge(response)
        except TimeoutError:
            return _timeout_error(timeout_s)
        except aiohttp.ClientError as e:
            return Outcome("retry", error=self._redact(describe(e)))
        except Exception as e:  # aiohttp raises more than ClientError; never stop the dispatcher
            log.exception("handler.http_unexpected", handler=self.name)
            return Outcome("retry", error=self._redact(describe(e)))

    async def close(self) -> None:
        """Nothing to release: the session belongs to the caller."""

    async def _judge(self, response: aiohttp.ClientResponse) -> Outcome:
        status = response.status
        if 200 <= status < 300:
            return DONE
        snippet = (await response.content.read(512)).decode("utf-8", errors="replace")
        error = self._redact(f"HTTP {status} {response.reason or ''}: {snippet}".strip(" :"))
        if status in self.RETRY_STATUSES or status >= 500:
            retry_after_s = None
            if status in self.RETRY_AFTER_STATUSES:
                retry_after_s = parse_retry_after(response.headers.get("Retry-After"))
            return Outcome("retry", error=error, retry_after_s=retry_after_s)
        if 300 <= status < 400:
            error += f" (redirect to {self._redact(response.headers.get('Location', '?'))})"
        return Outcome("dead", error=error)

    def _redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return _short(text)


def _check_url(handler: str, url: str) -> URL:
    try:
        parsed = URL(url)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"handlers.{handler}.url: not a URL") from e
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ConfigError(f"handlers.{handler}.url: must be an absolute http:// or https:// URL")
    return parsed


def _credentials(settings: HttpHandlerSettings) -> str | None:
    """The credentials part of the Authorization header, or None without auth."""
    if settings.auth == "bearer" and settings.bearer_token is not None:
        return settings.bearer_token.get_secret_value()
    if settings.auth == "basic" and settings.basic_password is not None:
        if ":" in settings.basic_username:
            raise ConfigError(f"handlers.{settings.name}.basic_username: must not contain ':'")
        pair = f"{settings.basic_username}:{settings.basic_password.get_secret_value()}"
        return base64.b64encode(pair.encode()).decode("ascii")
    return None


def _base_headers(settings: HttpHandlerSettings, credentials: str | None) -> CIMultiDict[str]:
    headers: CIMultiDict[str] = CIMultiDict({"Content-Type": "application/json"})
    headers.update(settings.headers)
    if credentials is None:
        return headers
    if "Authorization" in headers:
        raise ConfigError(
            f"handlers.{settings.name}: set auth = 'none' to send your own Authorization header"
        )
    scheme = "Bearer" if settings.auth == "bearer" else "Basic"
    headers["Authorization"] = f"{scheme} {credentials}"
    return headers


def _secrets_of(
    settings: HttpHandlerSettings, url: URL, credentials: str | None
) -> tuple[str, ...]:
    """Every string that must never appear in an error message."""
    password = settings.basic_password
    found = [url.password, credentials, password.get_secret_value() if password else None]
    return tuple(s for s in found if s)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or HTTP-date); None if unusable."""
    return retry_after_s(value, time.time())


# --- python -----------------------------------------------------------------------------------


class PythonHandler:
    """Calls ``pkg.module:function(envelope)``: async ones awaited, sync ones in a thread."""

    def __init__(self, settings: PythonHandlerSettings, secrets: Sequence[str] = ()) -> None:
        self.name = settings.name
        self._settings = settings
        self._secrets = tuple(secrets)
        self._target = _load_callable(settings.name, settings.callable)
        call = getattr(self._target, "__call__", None)  # noqa: B004 - objects with async __call__
        self._is_async = inspect.iscoroutinefunction(self._target) or (
            inspect.iscoroutinefunction(call)
        )

    async def deliver(self, envelope: Mapping[str, Any], body: bytes, attempt: int) -> Outcome:
        """Call the function once; PermanentError is dead, any other exception is retried."""
        deadline = asyncio.timeout(self._settings.timeout_s)
        try:
            async with deadline:
                # A fresh copy, so the function cannot change what the dispatcher holds.
                await self._call(json.loads(body))
        except PermanentError as e:
            return Outcome("dead", error=self._error(e))
        except TimeoutError as e:
            if deadline.expired():
                return _timeout_error(self._settings.timeout_s)
            return Outcome("retry", error=self._error(e))
        except (Exception, SystemExit) as e:  # a sys.exit() in a handler must not stop us
            return Outcome("retry", error=self._error(e))
        return DONE

    def _error(self, error: BaseException) -> str:
        """The exception as kept text: a message may quote a secret (a connection string)."""
        text = describe(error)
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return _short(text)

    async def close(self) -> None:
        """Nothing to release."""

    async def _call(self, argument: dict[str, Any]) -> None:
        if self._is_async:
            await self._target(argument)
        else:
            await run_in_daemon_thread(self._target, argument)


def _load_callable(handler: str, spec: str) -> Callable[..., Any]:
    where = f"handlers.{handler}.callable"
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # importing runs arbitrary code
        raise ConfigError(f"{where}: cannot import {module_name!r}: {describe(e)}") from e
    target = getattr(module, attribute, None)
    if target is None:
        raise ConfigError(f"{where}: {module_name!r} has no attribute {attribute!r}")
    if not callable(target):
        raise ConfigError(f"{where}: {spec!r} is not callable")
    return target  # type: ignore[no-any-return]


def run_in_daemon_thread(function: Callable[[Any], T], argument: Any) -> Awaitable[T]:
    """Run a blocking call in a new daemon thread, with the caller's context variables.

    Not ``asyncio.to_thread``: a thread cannot be killed, and on Python 3.11 a hung worker
    of the default executor would block ``asyncio.run`` from returning at shutdown (and,
    piling up, starve every other ``to_thread`` user). A daemon thread is simply abandoned.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()
    context = contextvars.copy_context()

    def settle(outcome: Callable[[], None]) -> None:
        if not future.done():  # cancelled by a timeout meanwhile
            outcome()

    def run() -> None:
        try:
            result = context.run(function, argument)
        except BaseException as e:  # handed to the awaiting task, which decides
            error = e
            _call_soon(loop, settle, lambda: future.set_exception(error))
        else:
            _call_soon(loop, settle, lambda: future.set_result(result))

    threading.Thread(target=run, name="tcbridge-python-handler", daemon=True).start()
    return future


def _call_soon(
    loop: asyncio.AbstractEventLoop,
    settle: Callable[[Callable[[], None]], None],
    outcome: Callable[[], None],
) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
        loop.call_soon_threadsafe(settle, outcome)
