"""The ``--store`` URL: its check and its redacted form. Pure (no I/O)."""

from __future__ import annotations

import urllib.parse

POSTGRES_SCHEMES = ("postgresql", "postgres")


def redact_url(url: str) -> str:
    """``url`` with its password (if any) as ``***``: for logs, errors and the dashboard."""
    try:
        parts = urllib.parse.urlsplit(url)
        password = parts.password
    except ValueError:
        return url
    if password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    user = urllib.parse.quote(parts.username or "", safe="")
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def check_store_url(url: str) -> str:
    """``url`` stripped, if it is a ``postgresql://`` (or ``postgres://``) URL. Raises
    ValueError saying what it should look like (the password never shown)."""
    text = url.strip()
    try:
        parts = urllib.parse.urlsplit(text)
        parts.port  # noqa: B018 (raises on a bad port)
    except ValueError:
        raise ValueError(f"has a bad host or port: {redact_url(text)!r}") from None
    if parts.scheme not in POSTGRES_SCHEMES:
        raise ValueError(
            "must be a postgresql://USER@HOST:PORT/DATABASE URL (or empty for latency.db in "
            f"the data dir), got {redact_url(text)!r}"
        )
    return text
