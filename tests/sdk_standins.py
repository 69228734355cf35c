"""Loopback stand-ins for the token services the real SDKs exchange jwt-proxy's token at.

* :class:`GoogleSTSStandIn`: Google's STS token endpoint (``token_url`` of an
  ``external_account`` credential configuration): an RFC 8693 token exchange.
* :class:`EntraStandIn`: a Microsoft Entra authority over HTTPS (MSAL accepts no other):
  the tenant's OpenID discovery document, for MSAL versions that ask for it, and the
  v2.0 token endpoint, a ``client_credentials`` grant with a ``client_assertion``.

Both accept a subject token or assertion only if it is a JWT signed by the local-sts
under test for the expected audience (checked against its JWKS), as the real services
check the issuer's keys, and record what they received.
"""

from __future__ import annotations

import json
import ssl
import threading
import typing as t
import urllib.parse
from http.server import BaseHTTPRequestHandler
from http.server import ThreadingHTTPServer
from pathlib import Path

import jwt

from tests.upstream import make_tls_files

ACCESS_TOKEN_LIFETIME_S = 3600
TOKEN_EXCHANGE_GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
JWT_BEARER_ASSERTION = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


class _StandIn:
    """A threaded loopback HTTP(S) server whose subclass answers ``handle(method, path, form)``."""

    def __init__(self, sts_url: str, audience: str, ssl_context: ssl.SSLContext | None = None) -> None:
        self.sts_url = sts_url
        self.audience = audience
        self.received: list[dict[str, t.Any]] = []
        self.accepted_claims: list[dict[str, t.Any]] = []
        self._keys = jwt.PyJWKClient(f"{sts_url}/.well-known/jwks.json")
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: t.Any) -> None:
                pass

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                form = dict(urllib.parse.parse_qsl(self.rfile.read(length).decode())) if length else {}
                status, body = stand_in.handle(self.command, self.path, form)
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = _answer

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        if ssl_context is not None:
            self._server.socket = ssl_context.wrap_socket(self._server.socket, server_side=True)
        scheme = "https" if ssl_context is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc: t.Any) -> None:
        self._server.shutdown()
        self._server.server_close()

    def verify(self, token: str) -> dict[str, t.Any] | None:
        """The claims of a local-sts JWT for our audience, or None."""
        try:
            key = self._keys.get_signing_key_from_jwt(token)
            claims = jwt.decode(token, key.key, algorithms=["RS256", "ES384"], audience=self.audience, issuer=self.sts_url)
        except jwt.PyJWTError:
            return None
        self.accepted_claims.append(claims)
        return claims

    def handle(self, method: str, path: str, form: dict[str, str]) -> tuple[int, dict[str, t.Any]]:
        raise NotImplementedError


class GoogleSTSStandIn(_StandIn):
    """``POST /v1/token``: exchanges a local-sts JWT for an access token (RFC 8693)."""

    TOKEN_PATH = "/v1/token"

    @property
    def token_url(self) -> str:
        return self.url + self.TOKEN_PATH

    def handle(self, method, path, form):
        self.received.append({"method": method, "path": path, "form": form})
        if method != "POST" or path != self.TOKEN_PATH:
            return 404, {"error": "not_found"}
        if form.get("grant_type") != TOKEN_EXCHANGE_GRANT or form.get("subject_token_type") != JWT_TOKEN_TYPE:
            return 400, {"error": "invalid_request", "error_description": "unsupported grant or subject token type"}
        if form.get("audience") != self.audience:
            return 400, {"error": "invalid_target", "error_description": "unknown workload identity provider"}
        claims = self.verify(form.get("subject_token", ""))
        if claims is None:
            return 400, {"error": "invalid_grant", "error_description": "the subject token is not valid"}
        return 200, {
            "access_token": f"ya29.stand-in.{claims['jti']}",
            "issued_token_type": ACCESS_TOKEN_TYPE,
            "token_type": "Bearer",
            "expires_in": ACCESS_TOKEN_LIFETIME_S,
        }


class EntraStandIn(_StandIn):
    """A tenant's OpenID discovery and its v2.0 token endpoint, over HTTPS."""

    def __init__(self, sts_url: str, audience: str, tenant: str, ssl_context: ssl.SSLContext) -> None:
        super().__init__(sts_url, audience, ssl_context)
        self.tenant = tenant

    def handle(self, method, path, form):
        self.received.append({"method": method, "path": path, "form": form})
        base = f"{self.url}/{self.tenant}"
        if method == "GET" and path.split("?")[0] == f"/{self.tenant}/v2.0/.well-known/openid-configuration":
            return 200, {
                "issuer": f"{base}/v2.0",
                "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
                "token_endpoint": f"{base}/oauth2/v2.0/token",
                "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
                "jwks_uri": f"{base}/discovery/v2.0/keys",
            }
        if method == "POST" and path.split("?")[0] == f"/{self.tenant}/oauth2/v2.0/token":
            if form.get("grant_type") != "client_credentials" or form.get("client_assertion_type") != JWT_BEARER_ASSERTION:
                return 400, {"error": "invalid_request", "error_description": "unsupported grant"}
            claims = self.verify(form.get("client_assertion", ""))
            if claims is None:
                return 401, {"error": "invalid_client", "error_description": "AADSTS700211: assertion not valid"}
            return 200, {
                "token_type": "Bearer",
                "expires_in": ACCESS_TOKEN_LIFETIME_S,
                "ext_expires_in": ACCESS_TOKEN_LIFETIME_S,
                "access_token": f"entra.stand-in.{claims['jti']}",
            }
        return 404, {"error": "not_found"}


def make_test_ca(directory: Path) -> tuple[Path, ssl.SSLContext]:
    """A CA certificate (written to ``directory``) and a server context for 127.0.0.1 signed by it."""
    files = make_tls_files(str(directory), ("127.0.0.1",))
    return Path(files.ca_file), files.server_context()

