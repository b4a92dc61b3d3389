"""ksi-provider-openai: the KSI host provider plugin that calls OpenAI-compatible endpoints directly.

One pooled aiohttp client per plugin instance, one HTTP request per attempt,
no retries of its own. Deployments, circuits and error mapping come from the
provider kit (:mod:`ksi_host.providers`), exactly as for every other provider
plugin; the host orders provider plugins by ``priority``.
"""

__version__ = "0.1.0"
