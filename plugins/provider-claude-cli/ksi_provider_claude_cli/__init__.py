"""ksi-provider-claude-cli: the KSI host provider plugin that runs the ``claude`` command line.

One ``claude -p --output-format json`` process per attempt; ``--resume`` keeps
a host session's conversation going. Deployments, circuits and error mapping
come from the provider kit (:mod:`ksi_host.providers`); the host orders
provider plugins by ``priority``.
"""

__version__ = "0.1.0"
