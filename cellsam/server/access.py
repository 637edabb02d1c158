"""Who may use the server: the access token, the names allowed in ``Host``, and the origin of
state-changing requests.

``cellsam serve`` makes a random token and prints the address with it (``http://127.0.0.1:8000/?token=...``,
as Jupyter does). Opening that address sets a cookie (``SameSite=Strict``, one name per port); the page
also sends the token in the ``X-CellSAM-Token`` header. Three checks guard every request:

- **Host**: the ``Host`` header must name the bound address or a loopback name (``127.0.0.1``,
  ``localhost``, ``::1``), so a foreign name that resolves to this machine (DNS rebinding) is refused;
  a server bound to every interface (``0.0.0.0``) accepts any name and relies on its token.
- **Origin**: a POST / PUT / PATCH / DELETE sent by a browser must come from the server's own origin
  (``Origin`` equal to the ``Host`` it was sent to; ``Sec-Fetch-Site`` same-origin or none); requests
  without these headers (curl, scripts) are not browser requests from another site and pass.
- **Token**: when the server has one, every request but the page, its static files and the icon
  must carry it (header or cookie).
"""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
TOKEN_HEADER = "X-CellSAM-Token"
TOKEN_COOKIE = "cellsam_token"
OPEN_PATHS = ("/", "/favicon.ico")


@dataclass(frozen=True)
class Refusal:
    """Why a request is refused, and the HTTP status to answer with."""

    status: int
    message: str


@dataclass(frozen=True)
class Access:
    """The server's access rules.

    Attributes:
        token: required on every API request when set.
        hosts: names (lower case, without port) the ``Host`` header may carry; None accepts any.
    """

    token: str | None = None
    hosts: frozenset[str] | None = None

    @classmethod
    def for_bind(cls, bind_host: str, *, token: str | None, extra_hosts: Iterable[str] = ()) -> Access:
        """The rules of a server listening on ``bind_host``.

        Raises:
            ValueError: no token while listening beyond loopback.
        """
        if token is None and not is_loopback(bind_host):
            raise ValueError(f"a server listening on {bind_host!r} needs an access token: --no-token is only "
                             f"allowed with a loopback --host ({', '.join(LOOPBACK_NAMES)})")
        if bind_host.strip("[]") in WILDCARD_HOSTS:
            return cls(token=token, hosts=None)
        names = {*LOOPBACK_NAMES, bind_host, *extra_hosts}
        return cls(token=token, hosts=frozenset(n.strip("[]").lower() for n in names))


def new_token() -> str:
    """A random URL-safe token (192 bits)."""
    return secrets.token_urlsafe(24)


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_name(host_header: str) -> str:
    """The name of a ``Host`` / origin ``host[:port]`` (lower case, without port and IPv6 brackets)."""
    h = host_header.strip().lower()
    if h.startswith("["):
        return h[1 : h.find("]")] if "]" in h else h[1:]
    name, sep, port = h.rpartition(":")
    return name if sep and port.isdigit() and ":" not in name else h


def cookie_name(port: int | None) -> str:
    """The token cookie of the server on ``port`` (cookies are shared by every port of a host)."""
    return f"{TOKEN_COOKIE}_{port}" if port else TOKEN_COOKIE


def token_matches(given: str | None, access: Access) -> bool:
    return access.token is not None and given is not None and secrets.compare_digest(given, access.token)


def check_request(
    access: Access,
    *,
    method: str,
    path: str,
    headers: Mapping[str, str],
    cookies: Mapping[str, str],
    port: int | None,
) -> Refusal | None:
    """None when the request may go on, else why not (see the module docstring)."""
    host = headers.get("host", "")
    if access.hosts is not None and host_name(host) not in access.hosts:
        return Refusal(403, f"Host {host!r} is not allowed: open the address printed by `cellsam serve` "
                            f"(names allowed here: {', '.join(sorted(access.hosts))})")
    if method.upper() in UNSAFE_METHODS:
        refused = _cross_site(headers, host)
        if refused is not None:
            return refused
    if access.token and not (path in OPEN_PATHS or path.startswith("/static/")):
        given = headers.get(TOKEN_HEADER.lower()) or cookies.get(cookie_name(port))
        if not token_matches(given, access):
            return Refusal(401, "missing or wrong access token: open the address printed by `cellsam serve` "
                                "(it ends in ?token=...)")
    return None


def _cross_site(headers: Mapping[str, str], host: str) -> Refusal | None:
    """A refusal when a browser sent this state-changing request from another origin."""
    site = headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return Refusal(403, f"cross-site request refused (Sec-Fetch-Site: {site}): use the cellsam page itself")
    origin = headers.get("origin")
    if origin is None:
        return None
    netloc = urlsplit(origin).netloc.lower() if origin != "null" else ""
    if not netloc or netloc != host.strip().lower():
        return Refusal(403, f"cross-origin request from {origin!r} refused: only the cellsam page at "
                            f"http://{host}/ may change this project")
    return None
