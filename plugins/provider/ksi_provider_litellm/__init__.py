"""ksi-provider-litellm: the KSI host provider plugin that calls upstreams through litellm.

Importing this package (or :mod:`ksi_provider_litellm.plugin`) does not import
litellm; that happens on the first call of a deployment.
"""

__version__ = "0.1.0"
