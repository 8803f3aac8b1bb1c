"""API keys and per-key limits, shared by every route of the app (the realtime websocket and HTTP routers).

Why one object: a key's concurrent sessions and requests per minute are counted across all routes, so
a websocket and, say, a chat-completions router draw from the same allowance. An HTTP router uses it as
a FastAPI dependency::

    from fastapi import Depends
    from realtime.auth import AUTH_RESPONSES, Principal, require_key

    @router.post("/v1/chat/completions", responses=AUTH_RESPONSES)
    async def chat(body: ..., who: Annotated[Principal, Depends(require_key)]): ...

``require_key`` finds the ``Authenticator`` at ``request.app.state.auth`` (``create_app`` puts it there),
checks the key and the key's requests-per-minute, and refuses with a JSON ``{"error": {...}}`` body
(401 ``invalid_api_key``, 429 ``key_rate_limited``, 503 ``server_shutting_down`` while the server drains).

Keys are compared in constant time against every configured key, and never logged: logs and metrics
name a key by ``key_hash`` (the first 12 hex digits of its SHA-256).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

from fastapi import Request
from fastapi.responses import JSONResponse

from realtime.metrics import Metrics
from realtime.protocol import ErrorCode

log = logging.getLogger(__name__)

ANONYMOUS = "anonymous"  # the principal of every request when no keys are configured
SUBPROTOCOL_PREFIX = "openai-insecure-api-key."  # browsers cannot set websocket headers (OpenAI's convention)


def key_hash(key: str) -> str:
    """What logs, metrics and records call a key: short, stable, not reversible."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class KeyLimits:
    """Per-key allowances; 0 means unlimited."""

    max_sessions: int = 0  # concurrent realtime sessions
    rpm: int = 0  # requests (new sessions and HTTP API calls) per rolling minute

    def __post_init__(self) -> None:
        if self.max_sessions < 0 or self.rpm < 0:
            raise ValueError("key limits must be >= 0 (0: unlimited)")


@dataclass(frozen=True)
class ApiKey:
    key: str = field(repr=False)
    limits: KeyLimits = KeyLimits()

    def __post_init__(self) -> None:
        if not self.key or any(c.isspace() for c in self.key):
            raise ValueError("an API key must be non-empty and contain no whitespace")

    @property
    def hash(self) -> str:
        return key_hash(self.key)


@dataclass(frozen=True)
class Principal:
    """Who a request is: the key's hash (or ``anonymous``) and its limits."""

    key_hash: str
    limits: KeyLimits = KeyLimits()


class AuthError(Exception):
    """A refused request: an HTTP status, a stable code and a message that says what to do."""

    def __init__(self, status: int, code: ErrorCode, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.retry_after = status, code, message, retry_after

    def body(self) -> dict:
        kind = "server_error" if self.status >= 500 else "invalid_request_error"
        return {"error": {"type": kind, "code": self.code.value, "message": self.message}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


ERROR_BODY_SCHEMA = {
    "type": "object", "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["type", "code", "message"], "properties": {
        "type": {"type": "string"}, "code": {"type": "string"}, "message": {"type": "string"}}}},
}
_error_content = {"application/json": {"schema": ERROR_BODY_SCHEMA}}
AUTH_RESPONSES: dict[int | str, dict] = {  # the OpenAPI ``responses`` of a route that depends on require_key
    401: {"description": "missing or wrong API key (code invalid_api_key)", "content": _error_content},
    429: {"description": "the key's requests per minute are used up (code key_rate_limited; Retry-After)",
          "content": _error_content},
    503: {"description": "the server is draining before it shuts down (code server_shutting_down)",
          "content": _error_content},
}


_LIMIT_RE = re.compile(r"^(max_sessions|rpm)=(\d+)$")


def parse_keys_file(text: str, source: str = "keys file") -> list[ApiKey]:
    """One key per line, optionally followed by limits: ``KEY [max_sessions=N] [rpm=N]``; ``#`` comments.

    Errors name the line, never the key.
    """
    keys: list[ApiKey] = []
    seen: set[str] = set()
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        key, *opts = line.split()
        limits: dict[str, int] = {}
        for opt in opts:
            m = _LIMIT_RE.match(opt)
            if m is None:
                raise ValueError(f"{source}:{n}: unknown option {opt.split('=', 1)[0]!r}; "
                                 "use max_sessions=N and/or rpm=N after the key")
            limits[m.group(1)] = int(m.group(2))
        if key in seen:
            raise ValueError(f"{source}:{n}: the same key is listed twice")
        seen.add(key)
        keys.append(ApiKey(key, KeyLimits(**limits)))
    return keys


def load_keys(plain: Iterable[str], keys_file: str | Path | None, default: KeyLimits) -> list[ApiKey]:
    """Keys from ``--api-key``/``RT_API_KEYS`` (with the default limits) and from a keys file."""
    keys = {k: ApiKey(k, default) for k in plain if k}
    if keys_file:
        path = Path(keys_file)
        if not path.is_file():
            raise FileNotFoundError(f"API keys file not found: {path}")
        for k in parse_keys_file(path.read_text(), str(path)):
            # a file line without limits gets the defaults; its own limits win over a plain key's
            given = k.limits != KeyLimits()
            keys[k.key] = k if given else ApiKey(k.key, default)
    return list(keys.values())


def key_from(headers: Mapping[str, str], query: Mapping[str, str], subprotocols: Iterable[str] = ()) -> str | None:
    """The presented key: ``Authorization: Bearer``, ``x-api-key``, ``?api_key=``, or a websocket subprotocol."""
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    if headers.get("x-api-key"):
        return headers["x-api-key"]
    if query.get("api_key"):
        return query["api_key"]
    for p in subprotocols:
        if p.startswith(SUBPROTOCOL_PREFIX):
            return p[len(SUBPROTOCOL_PREFIX):]
    return None


class _Window:
    """Timestamps of a key's recent requests (at most ``rpm`` kept): a rolling one-minute window."""

    def __init__(self, rpm: int) -> None:
        self.times: deque[float] = deque(maxlen=rpm)

    def take(self, now: float) -> float | None:
        """Count one request, or return the seconds until one is allowed."""
        if len(self.times) == self.times.maxlen and now - self.times[0] < 60.0:
            return 60.0 - (now - self.times[0])
        self.times.append(now)
        return None


class Authenticator:
    """Checks keys and counts each key's sessions and requests. Thread-safe (sync routes run in threads)."""

    def __init__(self, keys: Iterable[ApiKey], metrics: Metrics | None = None) -> None:
        self._keys = [(hashlib.sha256(k.key.encode()).digest(), k) for k in keys]
        self.metrics = metrics
        self.draining = False  # set by the drain: new work is refused with 503
        self._lock = threading.Lock()
        self._sessions: dict[str, int] = {}
        self._windows: dict[str, _Window] = {}

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def authenticate(self, presented: str | None) -> Principal:
        """The principal of a presented key, or ``AuthError`` 401."""
        if not self._keys:
            return Principal(ANONYMOUS)
        if presented:
            digest = hashlib.sha256(presented.encode()).digest()  # equal lengths: no length leak
            match = None
            for d, k in self._keys:  # all of them, always: the time does not say which one matched
                if hmac.compare_digest(d, digest):
                    match = k
            if match is not None:
                return Principal(match.hash, match.limits)
        self._refused("unauthorized")
        log.info("refused a request with %s", f"key {key_hash(presented)}" if presented else "no key")
        raise AuthError(401, ErrorCode.INVALID_API_KEY,
                        "missing or wrong API key (Authorization: Bearer KEY, x-api-key: KEY, or ?api_key=KEY)")

    @property
    def key_hashes(self) -> list[str]:
        return [k.hash for _, k in self._keys]

    def admit(self, presented: str | None, refuse_draining: bool = True) -> Principal:
        """Authenticate and count one request against the key's requests per minute (429 beyond);
        while the server drains, refuse with 503 (``refuse_draining=False``: the caller says it its own way)."""
        if self.draining and refuse_draining:
            self._refused("draining")
            raise AuthError(503, ErrorCode.SERVER_SHUTTING_DOWN,
                            "the server is shutting down; retry on another replica or in a few seconds",
                            retry_after=5)
        who = self.authenticate(presented)
        if who.limits.rpm:
            with self._lock:
                window = self._windows.setdefault(who.key_hash, _Window(who.limits.rpm))
                wait = window.take(time.monotonic())
            if wait is not None:
                self._refused("key_rate_limited")
                log.info("key %s is over %d requests per minute", who.key_hash, who.limits.rpm)
                raise AuthError(429, ErrorCode.KEY_RATE_LIMITED,
                                f"this key is limited to {who.limits.rpm} requests per minute; "
                                f"retry in {wait:.0f} s", retry_after=max(1, int(wait + 0.999)))
        return who

    def open_session(self, who: Principal) -> SessionLease:
        """Take one of the key's concurrent sessions (429 ``key_session_limit_reached`` when all are taken)."""
        with self._lock:
            n = self._sessions.get(who.key_hash, 0)
            if who.limits.max_sessions and n >= who.limits.max_sessions:
                full = True
            else:
                full = False
                self._sessions[who.key_hash] = n + 1
        if full:
            self._refused("key_session_limit")
            log.info("key %s already has its %d sessions", who.key_hash, who.limits.max_sessions)
            raise AuthError(429, ErrorCode.KEY_SESSION_LIMIT,
                            f"this key may hold {who.limits.max_sessions} concurrent sessions; close one first",
                            retry_after=1)
        return SessionLease(self, who)

    def sessions_of(self, key_hash_: str) -> int:
        with self._lock:
            return self._sessions.get(key_hash_, 0)

    def _release(self, who: Principal) -> None:
        with self._lock:
            n = self._sessions.get(who.key_hash, 0) - 1
            if n > 0:
                self._sessions[who.key_hash] = n
            else:
                self._sessions.pop(who.key_hash, None)

    def _refused(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.refusals.labels(reason).inc()


class SessionLease:
    """One held session of a key; ``release`` (idempotent) gives it back."""

    def __init__(self, auth: Authenticator, who: Principal) -> None:
        self._auth, self.principal, self._held = auth, who, True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._auth._release(self.principal)


async def require_key(request: Request) -> Principal:
    """FastAPI dependency for HTTP routes: the caller's principal, or a coded JSON refusal."""
    auth: Authenticator = request.app.state.auth
    return auth.admit(key_from(request.headers, request.query_params))


async def auth_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """Registered by ``create_app``: an ``AuthError`` raised in any route becomes its JSON response."""
    assert isinstance(exc, AuthError)
    return exc.response()


# ------------------------------------------------------------------ keeping keys out of logs
_QUERY_KEY = re.compile(r"(api_key=)[^&\s\"']+", re.IGNORECASE)


class RedactKeys(logging.Filter):
    """Rewrites ``api_key=...`` in log records (uvicorn logs websocket and request paths with their query)
    to the key's hash; the record's shape is kept, so uvicorn's formatters still work."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = _redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(_redact(a) if isinstance(a, str) else a for a in record.args)
        return True


def _redact(text: str) -> str:
    if "api_key=" not in text.lower():
        return text
    return _QUERY_KEY.sub(lambda m: m.group(1) + "sha256:" + key_hash(unquote(m.group(0)[len(m.group(1)):])), text)


def install_log_redaction(names: Iterable[str] = ("uvicorn.access", "uvicorn.error")) -> None:
    """Idempotent: attach ``RedactKeys`` to the loggers that print request paths."""
    for name in names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactKeys) for f in logger.filters):
            logger.addFilter(RedactKeys())
