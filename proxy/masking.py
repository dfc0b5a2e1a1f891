"""Masking secrets in anything the proxy prints: config errors, logs, admin answers.

Store and upstream URLs carry passwords and tokens (`redis://:pw@host`, `?password=`,
`https://token@api`), and a refused config value is echoed to whoever reads the error: the
operator's terminal, the JSON log, the `/admin/reload` answer. Everything built from such a
value goes through here first. What cannot be read with confidence is masked whole: a
password holding an unencoded `/`, `?`, `#` or `@` would otherwise leak in pieces.
"""

from __future__ import annotations

import re
from urllib.parse import unquote_plus

MASK = "***"

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
# host[:port], several of them comma-separated (Sentinel, Cluster), IPv6 in brackets.
_HOSTS = re.compile(r"^[A-Za-z0-9.\-_~%:\[\],]*\Z")
# Query parameters whose value a user would call secret: password, ssl_password,
# sentinel_password, passwd, token, auth_token, client_secret, api_key, credentials...
_SECRET_NAME = re.compile(r"pass|pwd|secret|token|auth|credential|apikey|(?:^|[_\-.])key\Z", re.I)
# Longest plain string an error message quotes; longer ones are summarised by length.
_SHOWN_CHARS = 100


def redact_url(url: str) -> str:
    """`url` with its credentials masked; `***` alone when it is not a URL.

    Masked: the password of the userinfo (`redis://user:***@host`), the userinfo itself when
    it has no password (`redis://***@host`: a token), query values whose name says password,
    secret, token or key, and the fragment. A netloc of several hosts keeps its hosts. An
    authority that does not read as hosts, or an `@` after it, masks everything after the
    scheme.
    """
    match = _SCHEME.match(url)
    if match is None:
        return MASK
    scheme, rest = match.group(1), url[match.end() :]
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority, tail = rest[:end], rest[end:]
    userinfo, at, hosts = authority.rpartition("@")
    if "@" in tail or not _HOSTS.match(hosts):
        return f"{scheme}://{MASK}"
    if at:
        user, colon, _ = userinfo.partition(":")
        userinfo = f"{user}:{MASK}" if colon else MASK
    before_fragment, hash_sign, fragment = tail.partition("#")
    path, question, query = before_fragment.partition("?")
    pairs = [_masked_pair(pair) for pair in query.split("&")] if query else []
    return (
        f"{scheme}://{userinfo}{at}{hosts}{path}{question}{'&'.join(pairs)}"
        f"{hash_sign}{MASK if fragment else ''}"
    )


def _masked_pair(pair: str) -> str:
    name, equals, value = pair.partition("=")
    if equals and value and _SECRET_NAME.search(unquote_plus(name)):
        return f"{name}={MASK}"
    return pair


def quote_url(text: str) -> str:
    """A refused URL for a message: quoted with its credentials masked, or not shown at all."""
    masked = redact_url(text)
    return "a value that is not a URL (not shown)" if masked == MASK else f'"{masked}"'


_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>]*")


def redact_urls_in(text: str) -> str:
    """Free text (a library's error message, say) with every URL in it redacted."""
    return _URL_IN_TEXT.sub(lambda match: redact_url(match.group(0)), text)


def mask_text(text: str) -> str:
    """A refused string as a message may quote it: URL credentials masked, long text cut."""
    if "://" in text or "@" in text:  # could hold credentials: show only what parses
        return redact_url(text)
    if len(text) > _SHOWN_CHARS:
        return f"<{len(text)} characters>"
    return text


def show_value(value: object) -> str:
    """A refused config value, quoted for a message: strings masked, mappings not opened."""
    if isinstance(value, str):
        return repr(mask_text(value))
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "[" + ", ".join(show_value(item) for item in value) + "]"
    if value is None or isinstance(value, bool | int | float):
        return repr(value)
    return f"a {type(value).__name__}"
