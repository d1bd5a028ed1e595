"""Secrets stay out of names and messages.

Source URLs carry credentials (``rtsp://admin:password@camera/stream``, ``https://cdn/live.m3u8?token=...``) and
the Kafka settings carry passwords. Stream ids, error records, log lines and metric labels are derived from
the former and read by anyone with access to a topic or a dashboard, so everything that turns a URL or an
exception into a name or a message goes through :func:`redact`, which keeps what identifies a source (scheme,
host, port, path) and drops what grants access to it.
"""

from __future__ import annotations

import re
import threading

MASK = "***"

# scheme://[userinfo@]host...[?query][#fragment]; userinfo is greedy up to the last '@' before the path, so an
# unencoded '@' in a password is cut too; whitespace and quotes end a URL quoted in a message, and a closing
# bracket ends its query string
_URL = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?:[^\s/?#]*@)?(?P<rest>[^\s?#'\"<>]*)"
                  r"(?:[?#][^\s'\"<>)\]]*)?")

_lock = threading.Lock()
_secrets: tuple[str, ...] = ()


def redact(text: str) -> str:
    """``text`` with user info, query string and fragment cut from every URL in it, and every secret registered
    with :func:`keep_secret` masked. A URL on its own comes back as the same URL without them."""
    for secret in _secrets:
        text = text.replace(secret, MASK)
    return _URL.sub(r"\g<scheme>\g<rest>", text)


def keep_secret(value: str | None) -> None:
    """Mask ``value`` wherever :func:`redact` sees it from now on, e.g. a password read from the settings, which
    a client library might put in a debug log line of its configuration."""
    global _secrets
    if value:
        with _lock:
            # longest first, so a secret that contains another is masked whole
            _secrets = tuple(sorted({*_secrets, value}, key=len, reverse=True))
