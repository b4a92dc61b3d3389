"""ksi-queue: the durable, per-session ordered, prioritised queue of KSI host.

The plugin class is :class:`ksi_queue.plugin.Plugin` (entry point ``queue``).
"""

from .config import QueueConfig
from .plugin import Plugin

__all__ = ["Plugin", "QueueConfig"]
