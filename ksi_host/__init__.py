"""KSI host: runs LLM completions for agent systems through pluggy plugins.

The public API plugin authors and users import from here.
"""

from .db import Database
from .errors import (
    AuthFailed,
    BadRequest,
    BudgetExceeded,
    Cancelled,
    ConfigError,
    ContextWindowExceeded,
    DatabaseError,
    DatabaseStartupError,
    DeadlineExceeded,
    KsiError,
    MissingPluginError,
    NoProviderError,
    OperationalError,
    PluginLoadError,
    ProviderError,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
    StartupError,
    ValidationError,
)
from .hookspecs import hookimpl
from .models import (
    PRIORITIES,
    Attempt,
    AttemptContext,
    ChatDelta,
    CompletionRequest,
    CompletionResult,
    FailureDecision,
    Provider,
    ProviderInfo,
    ProviderResponse,
    RequestQuery,
    Ticket,
    UpstreamCall,
    Usage,
)
from .service import Host

__version__ = "0.1.0"

__all__ = [
    "PRIORITIES",
    "Attempt",
    "AttemptContext",
    "AuthFailed",
    "ChatDelta",
    "BadRequest",
    "BudgetExceeded",
    "Cancelled",
    "CompletionRequest",
    "CompletionResult",
    "ConfigError",
    "ContextWindowExceeded",
    "Database",
    "DatabaseError",
    "DatabaseStartupError",
    "DeadlineExceeded",
    "FailureDecision",
    "Host",
    "KsiError",
    "MissingPluginError",
    "NoProviderError",
    "OperationalError",
    "PluginLoadError",
    "Provider",
    "ProviderError",
    "ProviderInfo",
    "ProviderResponse",
    "ProviderTimeout",
    "ProviderUnavailable",
    "RateLimited",
    "RequestQuery",
    "StartupError",
    "Ticket",
    "UpstreamCall",
    "Usage",
    "ValidationError",
    "hookimpl",
]
