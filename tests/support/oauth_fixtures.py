"""pytest fixtures for the real OAuth authorization server (load with ``pytest_plugins``).

``oauth_provider_process``  session: the running oidc-provider (started once, ~1 s).
``oauth_provider``          per test: the same server, reset to a clean state (counters at zero,
                            no injected failure, default token lifetime).
``bearer_validator``        per test: a :class:`BearerValidator` for the provider's tokens with
                            the default audience, ready to pass as FhirTestServer ``auth=``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .bearer import BearerValidator
from .oauth_provider import OAuthTestProvider


@pytest.fixture(scope="session")
def oauth_provider_process(tmp_path_factory: pytest.TempPathFactory
                           ) -> Iterator[OAuthTestProvider]:
    provider = OAuthTestProvider.start(tmp_path_factory.mktemp("oauth-provider"))
    try:
        yield provider
    finally:
        provider.stop()


@pytest.fixture
def oauth_provider(oauth_provider_process: OAuthTestProvider) -> Iterator[OAuthTestProvider]:
    provider = oauth_provider_process
    if provider.process.poll() is not None:
        pytest.fail(f"the OAuth test provider has exited\n{provider.diagnostics()}")
    provider.reset()
    yield provider
    provider.reset()


@pytest.fixture
def bearer_validator(oauth_provider: OAuthTestProvider) -> BearerValidator:
    return BearerValidator(oauth_provider.jwks(), audience=oauth_provider.default_resource,
                           issuer=oauth_provider.issuer)
