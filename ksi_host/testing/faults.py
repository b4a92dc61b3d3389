"""What each failing fault of the test server must become in a provider plugin.

Every provider plugin maps upstream failures with :mod:`ksi_host.providers.errormap`, so that a
429 means the same to the retry plugin whichever plugin saw it. :data:`PROVIDER_FAULTS`
lists, for each fault mode of :class:`~ksi_host.testing.server.OpenAIServer` that fails
a call, the error class a provider's ``complete`` must raise and the HTTP status the
error must carry (None: no status). A provider plugin's tests take it as it is::

    @pytest.mark.parametrize(("fault", "error", "status"), PROVIDER_FAULTS)
    async def test_each_fault_maps(openai_server, fault, error, status): ...
"""

from __future__ import annotations

from ..errors import AuthFailed, BadRequest, ContextWindowExceeded, ProviderError, ProviderUnavailable, RateLimited

PROVIDER_FAULTS: list[tuple[str, type[ProviderError], int | None]] = [
    ("429", RateLimited, 429),
    ("500", ProviderUnavailable, 500),
    ("502", ProviderUnavailable, 502),
    ("503", ProviderUnavailable, 503),
    ("400", BadRequest, 400),
    ("context_length", ContextWindowExceeded, 400),
    ("401", AuthFailed, 401),
    ("403", AuthFailed, 403),
    ("malformed", ProviderUnavailable, None),
    ("disconnect", ProviderUnavailable, None),
]

__all__ = ["PROVIDER_FAULTS"]
