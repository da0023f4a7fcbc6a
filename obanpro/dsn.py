"""Connection strings: where a DSN comes from, and how to show one without its password."""

from __future__ import annotations

import re
from urllib.parse import parse_qs, unquote, urlsplit

_URL_PASSWORD = re.compile(r"^(?P<head>[a-z][a-z0-9+.-]*://[^:/@?#]*:)(?P<secret>[^@/?#]*)(?P<tail>@.*)$", re.I)
_QUERY_PASSWORD = re.compile(r"(?P<head>[?&]password=)(?P<secret>[^&#]*)", re.I)
_KEYWORD_PASSWORD = re.compile(r"(?P<head>\bpassword\s*=\s*)(?P<secret>'(?:[^'\\]|\\.)*'|\S+)", re.I)


def redact_dsn(dsn: str) -> str:
    """Return ``dsn`` with any password replaced by ``***``, in URL or key=value form."""
    redacted = _URL_PASSWORD.sub(r"\g<head>***\g<tail>", dsn)
    redacted = _QUERY_PASSWORD.sub(r"\g<head>***", redacted)

    if "://" not in redacted:
        redacted = _KEYWORD_PASSWORD.sub(r"\g<head>***", redacted)

    return redacted


def describe_dsn(dsn: str) -> str:
    """Return where ``dsn`` points, as ``host:port/database`` or ``socket dir/database``, never a password."""
    if "://" not in dsn:
        fields = dict(re.findall(r"(\w+)\s*=\s*('(?:[^'\\]|\\.)*'|\S+)", dsn))
        host = fields.get("host", "localhost").strip("'")
        port = fields.get("port", "5432").strip("'")
        database = fields.get("dbname", fields.get("user", "")).strip("'")
        return _place(host, port, database)

    try:
        parts = urlsplit(dsn)
        query = parse_qs(parts.query)
        host = unquote(parts.hostname or "") or query.get("host", ["localhost"])[0]
        port = str(parts.port or query.get("port", ["5432"])[0])
    except ValueError:
        return redact_dsn(dsn)

    database = unquote(parts.path.lstrip("/")) or unquote(parts.username or "")
    return _place(host, port, database)


def _place(host: str, port: str, database: str) -> str:
    if host.startswith("/"):
        return f"socket {host}/.s.PGSQL.{port} database {database or '?'}"

    return f"{host}:{port}/{database}"
