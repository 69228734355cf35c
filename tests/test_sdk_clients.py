"""The real Google Cloud and Azure SDKs read jwt-proxy's token and exchange it.

google-auth's identity-pool credentials (``credential_source.file``, then
``credential_source.url`` on the token endpoint) and azure-identity's
``WorkloadIdentityCredential`` (the token file) run unchanged; only their token services
are loopback stand-ins (``tests/sdk_standins.py``) that accept a subject token only if it
is a local-sts JWT for the configured audience.
"""

from __future__ import annotations

import urllib.parse

import google.auth.exceptions
import google.auth.transport.requests
import jwt
import pytest
from azure.core.exceptions import ClientAuthenticationError
from azure.identity import WorkloadIdentityCredential
from google.auth import identity_pool

from tests.conftest import free_port
from tests.sdk_helpers import AZURE_AUDIENCE
from tests.sdk_helpers import GOOGLE_AUDIENCE
from tests.sdk_helpers import GUARD
from tests.sdk_helpers import wait_for_file
from tests.sdk_standins import JWT_TOKEN_TYPE
from tests.sdk_standins import EntraStandIn
from tests.sdk_standins import GoogleSTSStandIn
from tests.sdk_standins import make_test_ca

pytestmark = pytest.mark.integration

GOOGLE_SCOPES = ["https://www.googleapis.com/auth/cloud-platform"]
AZURE_TENANT = "00000000-0000-0000-0000-00000000a2a2"
AZURE_CLIENT_ID = "11111111-1111-1111-1111-111111111111"
AZURE_SCOPE = "https://management.azure.com/.default"


def google_credentials(token_url: str, credential_source: dict) -> identity_pool.Credentials:
    info = {
        "type": "external_account",
        "audience": GOOGLE_AUDIENCE,
        "subject_token_type": JWT_TOKEN_TYPE,
        "token_url": token_url,
        "credential_source": credential_source,
    }
    return identity_pool.Credentials.from_info(info, scopes=GOOGLE_SCOPES)


def jti(token: str) -> str:
    return jwt.decode(token, options={"verify_signature": False})["jti"]


def test_google_identity_pool_reads_the_token_file(start_proxy, sts, tmp_path):
    path = tmp_path / "google-token"
    wrong = tmp_path / "azure-token"
    proxy = start_proxy("--token-file", f"{path}={GOOGLE_AUDIENCE}", "--token-file", f"{wrong}={AZURE_AUDIENCE}")
    token = wait_for_file(str(path), process=proxy)
    wait_for_file(str(wrong), process=proxy)
    with GoogleSTSStandIn(sts.url, GOOGLE_AUDIENCE) as google_sts:
        credentials = google_credentials(google_sts.token_url, {"file": str(path)})
        credentials.refresh(google.auth.transport.requests.Request())
        assert credentials.token == f"ya29.stand-in.{jti(token)}"
        assert credentials.valid
        # The stand-in checks: a token for another audience is not exchanged.
        refused = google_credentials(google_sts.token_url, {"file": str(wrong)})
        with pytest.raises(google.auth.exceptions.OAuthError, match="invalid_grant"):
            refused.refresh(google.auth.transport.requests.Request())
    assert [claims["aud"] for claims in google_sts.accepted_claims] == [GOOGLE_AUDIENCE]


def test_google_identity_pool_reads_the_token_endpoint(start_proxy, sts):
    port = free_port()
    start_proxy("--token-listen-addr", f"127.0.0.1:{port}", "--token-endpoint-audience", GOOGLE_AUDIENCE)
    url = f"http://127.0.0.1:{port}/token?" + urllib.parse.urlencode({"audience": GOOGLE_AUDIENCE})
    source = {"url": url, "headers": GUARD, "format": {"type": "json", "subject_token_field_name": "token"}}
    with GoogleSTSStandIn(sts.url, GOOGLE_AUDIENCE) as google_sts:
        credentials = google_credentials(google_sts.token_url, source)
        credentials.refresh(google.auth.transport.requests.Request())
        assert credentials.token.startswith("ya29.stand-in.")
        assert google_sts.accepted_claims[-1]["aud"] == GOOGLE_AUDIENCE
        # Without the header the endpoint refuses, and the SDK gets no subject token.
        unguarded = google_credentials(google_sts.token_url, {**source, "headers": {}})
        with pytest.raises(google.auth.exceptions.RefreshError):
            unguarded.refresh(google.auth.transport.requests.Request())
    assert len(google_sts.accepted_claims) == 1
    assert sts.stats()["by_audience"] == {GOOGLE_AUDIENCE: 1}


def test_azure_workload_identity_posts_the_token_file_as_client_assertion(start_proxy, sts, tmp_path):
    path = tmp_path / "azure-token"
    wrong = tmp_path / "google-token"
    proxy = start_proxy("--token-file", f"{path}={AZURE_AUDIENCE}", "--token-file", f"{wrong}={GOOGLE_AUDIENCE}")
    token = wait_for_file(str(path), process=proxy)
    wait_for_file(str(wrong), process=proxy)
    ca_path, server_context = make_test_ca(tmp_path)

    def credential(token_file):
        return WorkloadIdentityCredential(
            tenant_id=AZURE_TENANT,
            client_id=AZURE_CLIENT_ID,
            token_file_path=str(token_file),
            authority=entra.url,
            disable_instance_discovery=True,
            connection_verify=str(ca_path),
        )

    with EntraStandIn(sts.url, AZURE_AUDIENCE, AZURE_TENANT, server_context) as entra:
        access = credential(path).get_token(AZURE_SCOPE)
        assert access.token == f"entra.stand-in.{jti(token)}"
        with pytest.raises(ClientAuthenticationError):
            credential(wrong).get_token(AZURE_SCOPE)
    posted = [r["form"] for r in entra.received if r["method"] == "POST"]
    assert posted[0]["client_assertion"] == token
    assert posted[0]["client_id"] == AZURE_CLIENT_ID
    assert entra.url.startswith("https://")  # MSAL accepts only an https authority
    assert [claims["aud"] for claims in entra.accepted_claims] == [AZURE_AUDIENCE]
