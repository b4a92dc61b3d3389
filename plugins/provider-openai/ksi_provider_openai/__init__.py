"""ksi-provider-openai: the KSI host provider plugin that calls OpenAI-compatible endpoints directly.

One pooled aiohttp client per plugin instance, one HTTP request per attempt,
no retries of its own. Deployments, circuits, error mapping and the order
between provider plugins come from :mod:`ksi_host` (``deployments``,
``circuit``, ``errormap``), exactly as for every other provider plugin.
"""

__version__ = "0.1.0"
