"""ksi-serve: ``ksi-host serve``, the host as an OpenAI-compatible HTTP service (issue 19)."""

__version__ = "0.1.0"
