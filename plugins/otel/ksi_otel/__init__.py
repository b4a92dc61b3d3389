"""ksi-otel: OpenTelemetry spans of KSI host requests and attempts, after the GenAI semantic conventions.

The plugin is :class:`ksi_otel.plugin.Plugin` (entry point ``otel``). Nothing
here imports the OpenTelemetry SDK: it is imported when a host starts.
"""

__version__ = "0.1.0"
