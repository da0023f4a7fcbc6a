"""Connection strings: how to show one in logs and errors without its password."""

from __future__ import annotations

import os
import pwd
import re
from urllib.parse import parse_qs, unquote

SUPERUSER = "postgres"

_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_URL_QUERY_PASSWORD = re.compile(r"([?&;](?:ssl)?password=)[^&#]*", re.IGNORECASE)
_KEYWORD_PASSWORD = re.compile(
    r"(\b(?:ssl)?password\s*=\s*)('(?:\\.|[^'\\])*'?|\S*)", re.IGNORECASE
)
_KEYWORD_PAIR = re.compile(r"(\w+)\s*=\s*('(?:\\.|[^'\\])*'?|\S*)")


def redact_dsn(dsn: str) -> str:
    """Return *dsn* with every password replaced by ``***``.

    Handles URLs (``postgresql://user:secret@host/db``, ``?password=`` in the
    query) and libpq key=value strings (``password=secret`` or
    ``password='se cret'``). When a URL is malformed, for example a password
    with an unescaped ``/``, more than the password may be hidden, never less.
    """
    match = _URL_SCHEME.match(dsn)
    if match is None:
        return _KEYWORD_PASSWORD.sub(r"\1***", dsn)

    start = match.end()
    redacted = dsn[:start] + _redact_userinfo(dsn[start:])
    return _URL_QUERY_PASSWORD.sub(r"\1***", redacted)


def _redact_userinfo(rest: str) -> str:
    # A password may contain a raw '@', '/' or '?' that a careless caller did
    # not percent-encode. Taking the last '@' before the query, else the last
    # '@' anywhere, can hide more than the password but never shows part of it.
    query_start = rest.find("?")
    at = rest.rfind("@", 0, len(rest) if query_start == -1 else query_start)
    if at == -1:
        at = rest.rfind("@")
    if at == -1:
        return rest

    colon = rest.find(":", 0, at)
    if colon == -1:
        return rest
    return rest[: colon + 1] + "***" + rest[at:]


def describe_dsn(dsn: str) -> str:
    """Return ``host:port/database`` for *dsn*, safe for logs and error messages.

    For a unix socket the host is the socket directory, as in
    ``/home/me/.local/share/obanpro/pg18/run:54329/postgres``. A field missing
    from the DSN shows libpq's built-in default (``localhost``, ``5432``, the
    user name), not the ``PG*`` environment variables.
    """
    if not dsn.strip():
        return "(empty DSN)"

    # Parsing the redacted text keeps any part of a malformed password out.
    redacted = redact_dsn(dsn)
    if _URL_SCHEME.match(redacted):
        fields = _url_fields(redacted)
    else:
        fields = _keyword_fields(redacted)
    if fields is None:
        return "(DSN in an unrecognized format)"

    host = fields.get("host") or "localhost"
    database = fields.get("dbname") or fields.get("user") or _os_user_name()
    if "port" not in fields and "," in host:
        # A URL host list such as h1:5432,h2:5433 carries its own ports.
        return f"{host}/{database}"
    return f"{host}:{fields.get('port') or '5432'}/{database}"


def _os_user_name() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return SUPERUSER


def _url_fields(dsn: str) -> dict[str, str]:
    rest = dsn[_URL_SCHEME.match(dsn).end() :]
    rest, _, query = rest.partition("?")
    query = query.partition("#")[0]
    authority, _, path = rest.partition("/")

    userinfo, _, hostspec = authority.rpartition("@")
    fields = {"user": unquote(userinfo.partition(":")[0]), "dbname": unquote(path)}
    fields["host"], port = _split_host_port(unquote(hostspec))
    if port:
        fields["port"] = port
    for key, values in parse_qs(query).items():
        if key == "database":
            key = "dbname"
        if key in ("host", "port", "dbname", "user") and values:
            fields[key] = values[-1]
    return fields


def _split_host_port(hostspec: str) -> tuple[str, str]:
    if "," in hostspec:
        return hostspec, ""
    if hostspec.startswith("["):
        host, _, rest = hostspec.partition("]")
        return host + "]", rest.removeprefix(":")
    host, _, port = hostspec.partition(":")
    return host, port


def _keyword_fields(dsn: str) -> dict[str, str] | None:
    pairs = _KEYWORD_PAIR.findall(dsn)
    if not pairs:
        return None
    fields = {}
    for key, value in pairs:
        if value.startswith("'"):
            value = re.sub(r"\\(.)", r"\1", value[1:].removesuffix("'"))
        fields[key] = value
    return fields
