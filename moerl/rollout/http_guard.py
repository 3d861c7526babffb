"""What the built-in server checks about a request before reading it as an API call.

- **Host**: a web page can make a browser send requests to ``127.0.0.1:30000`` under a name the
  page's author controls (DNS rebinding). Without an API key the server therefore answers only
  requests whose ``Host`` names the address it is bound to (or ``localhost``), plus any names
  given with ``--allowed-hosts`` (``*`` turns the check off). With a key the check is off:
  a browser cannot attach ``Authorization`` to a cross-site request without a CORS pre-flight,
  which this server never grants.
- **Content type**: a body must be declared ``application/json``. Browsers send ``text/plain``,
  form and multipart bodies cross-site without a pre-flight; JSON they do not.
- **Bearer tokens** are compared as UTF-8 bytes in constant time (``secrets.compare_digest``
  refuses non-ASCII ``str``).
"""

from __future__ import annotations

import ipaddress
import secrets
import socket

_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def allowed_hosts(bind_host: str, *, api_key: str | None, extra: str = "") -> frozenset | None:
    """Host names a request may carry, or None for no check (a key is set, or ``*``)."""
    names = {name.strip().lower() for name in extra.split(",") if name.strip()}
    if api_key or "*" in names:
        return None
    names |= {bind_host.lower(), *_LOOPBACK_NAMES}
    if _is_wildcard(bind_host):  # every interface: also this machine's own names and addresses
        names |= _own_names()
    return frozenset(names)


def _own_names() -> set[str]:
    host = socket.gethostname()
    names = {host.lower(), socket.getfqdn().lower()}
    try:
        names |= {info[4][0].lower() for info in socket.getaddrinfo(host, None)}
    except OSError:
        pass
    return names


def _is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def host_allowed(header: str | None, allowed: frozenset | None) -> bool:
    if allowed is None:
        return True
    if not header:
        return False
    host = header.strip().lower()
    if host.startswith("["):  # [::1]:30000
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host in allowed


def is_json(content_type: str) -> bool:
    return content_type.split(";", 1)[0].strip().lower() == "application/json"


def token_matches(header: str, api_key: str) -> bool:
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(
        token.strip().encode("utf-8", "surrogateescape"), api_key.encode("utf-8"))
