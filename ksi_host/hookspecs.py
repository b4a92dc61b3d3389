"""The hooks of KSI host: the plugin author's manual.

A plugin is an object (a module, or an instance of a class) with functions
marked ``@ksi_host.hookimpl`` whose names are the hooks below. It is found
through an entry point in the group ``ksi_host``::

    [project.entry-points.ksi_host]
    myplugin = "my_package.plugin:MyPlugin"   # a class (instantiated once per Host) or a module

Rules that hold for every hook:

* A hookimpl may be ``def`` or ``async def``; the host awaits what comes back
  (so a plain ``def`` may also return an awaitable, such as the future of a
  ``host.db.execute``, and its answer is what that awaitable gives).
  Hookimpls may accept any subset of a hook's parameters, by name.
* ``firstresult`` hooks stop at the first hookimpl that returns something other
  than None (hookimpls run newest-registered first; ``tryfirst``/``trylast``
  reorder them, as in pluggy). Other hooks collect every non-None answer.
* Raising an :class:`~ksi_host.errors.OperationalError` (or a subclass) is an
  expected failure: it fails the request being handled (for request hooks) and
  flows into failure handling. Raising anything else is a programming error:
  the host lets it propagate with its traceback, adding a note that names the
  plugin and the hook. It is never swallowed.
* Hookwrappers are not supported.

``host`` is the running :class:`ksi_host.Host`: ``host.db`` (the async SQLite
helper), ``host.config`` (each plugin's validated config table), ``host.clock``
and ``host.sleep`` (injectable time), ``host.execute`` (run one request now),
``host.serve`` (False for read-only commands such as ``ksi-host usage``).
"""

from __future__ import annotations

import pluggy

PROJECT = "ksi_host"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

#: Which distribution to install when no plugin implements a needed hook.
INSTALL_HINTS: dict[str, str] = {
    "ksi_enqueue": "ksi-queue",
    "ksi_select_provider": "ksi-provider-litellm",
    "ksi_handle_failure": "ksi-retry",
    "ksi_record_usage": "ksi-tokens",
    "ksi_usage_report": "ksi-tokens",
    "ksi_cancel": "ksi-queue",
    "ksi_clear_session": "ksi-queue",
}

#: Which distribution declares a config table, for a table left behind by an uninstalled plugin.
TABLE_HINTS: dict[str, str] = {
    "queue": "ksi-queue",
    "litellm": "ksi-provider-litellm",
    "retry": "ksi-retry",
    "tokens": "ksi-tokens",
    "openai": "ksi-provider-openai",
    "claude_cli": "ksi-provider-claude-cli",
}


@hookspec
def ksi_config_spec():
    """Declare the plugin's config table.

    Called once, before start-up, without arguments.

    Return ``(table_name, cls)``: ``cls`` is an attrs class whose fields (with
    type annotations and defaults) are the keys of ``[table_name]`` in the
    config file. The host validates the table against it — unknown keys and
    wrong types stop start-up with a :class:`~ksi_host.errors.ConfigError` that
    names the key — and makes the instance available as
    ``host.config[table_name]`` (built from defaults when the table is absent).
    Nested attrs classes, ``list[...]`` of them (TOML arrays of tables) and
    ``dict[str, ...]`` are supported. Secrets never go in the file: name the
    environment variable that holds them (for example ``api_key_env``).

    Return None if the plugin has no config.
    """


@hookspec
def ksi_startup(host):
    """Open the plugin's resources.

    Called once when the host starts (``async with Host(...)``), after config
    validation and after ``host.db`` is open, in registration order. Create
    tables here with ``await host.db.migrate(name, [...])``; a queue restores
    unfinished work here and, when ``host.serve`` is true, starts running it.

    Returns nothing. Raising :class:`~ksi_host.errors.StartupError` stops start-up
    with its message; anything else is a programming error.
    """


@hookspec
def ksi_shutdown(host):
    """Close the plugin's resources.

    Called once when the host stops, in reverse registration order, before
    ``host.db`` is closed; also after a failed start-up for plugins whose
    ``ksi_startup`` ran. Stop background tasks and flush pending writes here.
    A queue must leave unfinished requests stored so a restart resumes them.

    Returns nothing.
    """


@hookspec(firstresult=True)
def ksi_enqueue(host, request):
    """Accept ``request`` (a :class:`~ksi_host.models.CompletionRequest`) into a queue.

    Called by ``host.submit``. Store the request durably, then return a
    :class:`~ksi_host.models.Ticket` whose ``result()`` the caller awaits. When
    the queue decides the request runs, it calls ``await host.execute(request)``
    (which selects a provider, calls it, handles failures and records usage),
    stores the final result, and completes the ticket with it.

    A request whose ``request_id`` already has a stored final result must not
    run again: return a ticket already done with the stored result. A request
    id that is queued or running returns a ticket for that same run.

    If ``host.execute`` raises (only programming errors do), complete the
    ticket with ``set_exception`` and leave the request stored as unfinished.

    Raise :class:`~ksi_host.errors.ValidationError` to refuse the request.
    firstresult: the first queue plugin that returns a ticket wins.
    Reference implementation: ``ksi-queue``.
    """


@hookspec(firstresult=True)
def ksi_select_provider(host, request, exclude):
    """Choose the provider (deployment) for the next attempt of ``request``.

    Called by ``host.execute`` before every attempt. ``exclude`` is a frozenset
    of provider names that already failed this request and must not be chosen.

    Return an object satisfying :class:`~ksi_host.models.Provider` (``name``,
    ``timeout_s``, ``async complete(request, *, timeout_s)``), or None when this
    plugin serves no usable deployment for ``request.model`` (another provider
    plugin may). When no plugin returns one, the request fails with
    :class:`~ksi_host.errors.NoProviderError` naming the model and the models
    ``ksi_list_providers`` reports.

    ``Provider.complete`` makes exactly one upstream attempt (no retries of its
    own) and raises OperationalErrors for failures. A provider plugin keeps its
    own circuit state from what its providers' calls return or raise
    (:class:`ksi_host.providers.deployment_provider.DeploymentProvider` does that around
    the plugin's own ``attempt``).

    Raise a retryable OperationalError (``ProviderUnavailable`` with
    ``retry_after``) when deployments serve the model but all are behind open
    circuits: the failure policy then waits instead of giving up.

    firstresult: provider plugins are asked in hook order. When several serve
    one model, the config decides which is tried first: the shared helper
    :meth:`ksi_host.providers.deployments.DeploymentPool.select_ranked` (with the hookimpl
    marked ``tryfirst``) answers None while a plugin with a lower ``priority``
    key has a usable deployment, so the host asks the next plugin.
    Reference implementation: ``ksi-provider-litellm``.
    """


@hookspec
def ksi_list_providers(host, model):
    """Describe the providers (deployments) this plugin serves.

    Called by the failure policy (is there another deployment for this model?),
    by ``ksi-host status`` and to name the configured models in a
    NoProviderError. ``model`` is a requested model name, or None for all.

    Return a list of :class:`~ksi_host.models.ProviderInfo` (name, model or
    pattern, plugin, circuit ``state``) for the deployments that serve
    ``model``, in the order they would be tried. Must not make network calls.
    """


@hookspec(firstresult=True)
def ksi_handle_failure(host, request, error, attempt):
    """Decide what a failed attempt becomes.

    Called by ``host.execute`` after an attempt of ``request`` raised
    ``error`` (an :class:`~ksi_host.errors.OperationalError`). ``attempt`` is an
    :class:`~ksi_host.models.AttemptContext`: the attempt number (from 1), the
    provider that failed, the clock readings and deadline, the earlier attempts
    and the providers already excluded.

    Return a :class:`~ksi_host.models.FailureDecision`:
    ``FailureDecision.retry(delay_s, switch_provider=True)`` to try again after
    ``delay_s`` on another provider (the failed one joins ``exclude``),
    ``FailureDecision.retry(delay_s)`` to try the same selection again, or
    ``FailureDecision.give_up(error)`` to end the request with an error result.
    The host waits with ``host.sleep``. The host never waits past the
    request's deadline: honour ``attempt.deadline`` in the decision.

    With no plugin implementing this hook, a failed attempt is final (the
    error message says ``pip install ksi-retry``).
    firstresult. Reference implementation: ``ksi-retry``.
    """


@hookspec
def ksi_record_usage(host, request, call):
    """Record one upstream call that reported token usage.

    Called by ``host.execute`` for every upstream call that reported usage,
    whether its attempt succeeded or failed, before the request's result is
    final. ``call`` is an :class:`~ksi_host.models.UpstreamCall` (request id,
    attempt number, provider, model, :class:`~ksi_host.models.Usage`,
    latency, outcome). Make the record durable before returning (group commit
    is fine: return once the batch is committed).

    Returns nothing. Every implementation is called.
    Reference implementation: ``ksi-tokens``.
    """


@hookspec(firstresult=True)
def ksi_usage_report(host, by, since):
    """Summarise recorded usage.

    Called by ``host.usage_report`` and ``ksi-host usage``. ``by`` is one of
    ``model``, ``agent``, ``session``, ``purpose``, ``provider``, ``day``;
    ``since`` is unix seconds or None for all time.

    Return a list of dicts, one per group, each with at least ``key``,
    ``calls``, ``requests``, ``prompt_tokens``, ``completion_tokens``,
    ``total_tokens``, ``cost_usd`` (None when no call's cost was known).
    Raise ValidationError for an unknown ``by``.
    firstresult. Reference implementation: ``ksi-tokens``.
    """


@hookspec
def ksi_status(host):
    """Report this plugin's state for ``ksi-host status`` and ``host.status()``.

    Return a dict ``{section_name: json_serialisable_data}`` (for example
    ``{"queue": {...}}`` or ``{"circuits": [...]}``), or None. The host merges
    the sections of every plugin.
    """


@hookspec(firstresult=True)
def ksi_cancel(host, request_id):
    """Cancel one request.

    Called by ``host.cancel``. A queued request ends with status ``cancelled``
    (its ticket completes with that result, which is stored). Return True if
    the request was found and cancelled, False if it was found but is already
    final, None if this plugin does not know it.
    firstresult. Reference implementation: ``ksi-queue``.
    """


@hookspec(firstresult=True)
def ksi_clear_session(host, session_id):
    """Cancel every queued request of ``session_id``.

    Called by ``host.clear_session``. Queued requests end with status
    ``cancelled``; the running one finishes. Return how many were cancelled.
    firstresult. Reference implementation: ``ksi-queue``.
    """
