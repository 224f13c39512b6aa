"""API keys and what they allow: who a request's tenant is and which priorities it may ask for.

Owns the operator's key configuration (``--api-key KEY[:tenant=NAME,trusted=1,min_priority=-5]``,
``--api-key-file keys.json``), authenticating a bearer token, and turning a request's identity
plus its headers into ``(priority, tenant)``. Invariants:

- With keys configured the tenant is the key's (its ``tenant`` or ``key<index>``); ``X-Tenant``
  counts only for a key marked ``trusted`` (a gateway naming its own clients), or when the server
  has no keys at all. An untrusted key's ``X-Tenant`` is ignored, never an escape from its limits.
- A request's priority (body ``priority``, else ``X-Priority``, else 0) must be >= its identity's
  ``min_priority`` (lower runs first, vLLM's convention); by default that is 0, so a client can
  never outrank the default class unless the operator's key allows it. Otherwise 400.
- Keys are non-empty and distinct; every comparison is constant-time against every key; a key is
  never logged, repr'd or echoed in an error.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from conveyor.errors import InvalidRequestError
from conveyor.server.http_errors import ApiError

logger = logging.getLogger("conveyor.serving")

DEFAULT_PRIORITY = 0
MAX_TENANT_CHARS = 128
_KEY_OPTIONS = "tenant=NAME, trusted=0|1, min_priority=INT"


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One accepted bearer key. tenant: None names it ``key<index>``; trusted: its requests may
    name their tenant with ``X-Tenant``; min_priority: the most urgent priority it may ask for."""

    key: str = field(repr=False)
    tenant: str | None = None
    trusted: bool = False
    min_priority: int = DEFAULT_PRIORITY


@dataclass(frozen=True, slots=True)
class Identity:
    """Who an authenticated request is."""

    tenant: str
    trusted: bool
    min_priority: int


# No keys: nobody can be told apart, so the client names its tenant; priorities stay capped.
ANONYMOUS = Identity("default", trusted=True, min_priority=DEFAULT_PRIORITY)


class _KeyEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: str
    tenant: str | None = None
    trusted: bool = False
    min_priority: int = Field(DEFAULT_PRIORITY, ge=-(2 ** 31), le=2 ** 31 - 1)


def _entry(values: dict, where: str, strict: bool) -> ApiKey:
    try:
        e = _KeyEntry.model_validate(values, strict=strict)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        name = ".".join(str(p) for p in err["loc"]) or "entry"
        if err["type"] == "extra_forbidden":
            raise InvalidRequestError(f"{where}: unknown option {name!r}; the options are "
                                      f"{_KEY_OPTIONS}") from None
        raise InvalidRequestError(f"{where}: invalid {name!r}: {err['msg']}") from None
    return ApiKey(e.key, e.tenant, e.trusted, e.min_priority)


def parse_api_key(spec: str, where: str = "--api-key") -> ApiKey:
    """``KEY`` or ``KEY:tenant=NAME,trusted=1,min_priority=-5`` (a key containing ':' goes in
    ``--api-key-file``). Errors name ``where``, never the key."""
    key, sep, options = spec.partition(":")
    values: dict = {"key": key}
    for item in options.split(",") if sep else ():
        name, eq, value = item.partition("=")
        if not eq or not name.strip():
            raise InvalidRequestError(f"{where}: expected KEY or KEY:{_KEY_OPTIONS.replace(', ', ',')}"
                                      f", got an option {name.strip()!r} without '='")
        if name.strip() == "key":
            raise InvalidRequestError(f"{where}: unknown option 'key'; the options are {_KEY_OPTIONS}")
        values[name.strip()] = value.strip()
    return check_key(_entry(values, where, strict=False), where)


def load_api_key_file(path: str) -> list[ApiKey]:
    """Keys from a JSON file: ``{"keys": [{"key": "...", "tenant": "acme", "trusted": false,
    "min_priority": 0}, ...]}`` (a bare list works too). Warns if others may read it."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        mode = os.stat(path).st_mode
    except (OSError, ValueError) as exc:
        raise InvalidRequestError(f"--api-key-file {path}: cannot read it as JSON ({exc})") from None
    if mode & 0o077:
        logger.warning("--api-key-file %s is readable by other users; chmod 600 it", path)
    entries = data.get("keys") if isinstance(data, dict) and set(data) == {"keys"} else data
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise InvalidRequestError(f'--api-key-file {path}: expected {{"keys": [{{"key": "...", '
                                  '"tenant": "..."}, ...]}')
    keys = []
    for i, entry in enumerate(entries):
        where = f"--api-key-file {path} entry #{i + 1}"
        keys.append(check_key(_entry(entry, where, strict=True), where))
    return keys


def check_key(key: ApiKey, where: str = "API key") -> ApiKey:
    if not key.key or key.key != key.key.strip():
        raise InvalidRequestError(f"{where}: a key must be non-empty, without surrounding spaces "
                                  "(an empty key would let anyone in)")
    if key.tenant is not None and check_tenant_name(key.tenant) is None:
        raise InvalidRequestError(f"{where}: tenant must be 1-{MAX_TENANT_CHARS} printable "
                                  "characters")
    return key


def check_keys(keys: tuple[ApiKey, ...]) -> tuple[ApiKey, ...]:
    """Each key valid, none twice (the second would silently shadow the first's rights)."""
    seen: set[str] = set()
    for i, key in enumerate(keys):
        check_key(key, f"API key #{i + 1}")
        if key.key in seen:
            raise InvalidRequestError(f"API key #{i + 1} is configured twice; keep one")
        seen.add(key.key)
    return keys


def check_tenant_name(name: str) -> str | None:
    """The name stripped, or None if it is empty, too long or has control characters."""
    name = name.strip()
    if not name or len(name) > MAX_TENANT_CHARS or not name.isprintable():
        return None
    return name


class KeyRing:
    """The configured keys and the identity each one grants."""

    def __init__(self, keys: tuple[ApiKey, ...]):
        self._digests = [hashlib.sha256(k.key.encode()).digest() for k in check_keys(keys)]
        self._identities = [Identity(k.tenant or f"key{i}", k.trusted, k.min_priority)
                            for i, k in enumerate(keys)]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def authenticate(self, token: str | None) -> Identity | None:
        """The identity of ``token``, or None; every key is compared, in constant time each."""
        if token is None:
            return None
        given, found = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest(), None
        for digest, identity in zip(self._digests, self._identities):
            if hmac.compare_digest(given, digest) and found is None:
                found = identity
        return found


def resolve(identity: Identity, headers: Mapping[str, str],
            body_priority: int | None) -> tuple[int, str]:
    """(priority, tenant) of a request: see the module invariants."""
    priority, param = body_priority, "priority"
    header = headers.get("x-priority")
    if priority is None and header is not None:
        param = "X-Priority"
        try:
            priority = int(header)
        except ValueError:
            raise ApiError(400, f"X-Priority must be an integer, got {header[:32]!r}",
                           param="X-Priority") from None
    priority = DEFAULT_PRIORITY if priority is None else priority
    if priority < identity.min_priority:
        raise ApiError(400, f"{param} {priority} is not allowed for this API key: the most urgent "
                            f"it may ask for is {identity.min_priority} (lower runs first); send "
                            f"{identity.min_priority} or more", param=param,
                       code="priority_not_allowed")
    tenant = identity.tenant
    header = headers.get("x-tenant")
    if identity.trusted and header is not None and header.strip():
        tenant = check_tenant_name(header)
        if tenant is None:
            raise ApiError(400, f"X-Tenant must be 1-{MAX_TENANT_CHARS} printable characters",
                           param="X-Tenant")
    return priority, tenant


def exposure_warning(host: str, has_keys: bool) -> str | None:
    """A warning when ``host`` is reachable from other machines and no key is required."""
    if has_keys or host == "localhost":
        return None
    try:
        if ipaddress.ip_address(host.strip("[]")).is_loopback:
            return None
    except ValueError:
        pass                    # a host name other than localhost: assume it is reachable
    return (f"listening on {host} without --api-key / --api-key-file: anyone who can reach it can "
            "use the model and name any tenant")
