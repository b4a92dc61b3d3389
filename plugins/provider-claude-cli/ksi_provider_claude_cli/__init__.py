"""ksi-provider-claude-cli: the KSI host provider plugin that runs the ``claude`` command line.

One ``claude -p --output-format json`` process per attempt; ``--resume`` keeps
a host session's conversation going. Deployments, circuits, error mapping and
the order between provider plugins come from :mod:`ksi_host`.
"""

__version__ = "0.1.0"
