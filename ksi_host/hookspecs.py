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
  Hookimpls may accept any subset of a hook's parameters, by name. A hookimpl
  whose name is not a hook below, or that takes a parameter its hook does not
  have, stops start-up (PluginLoadError, exit 2) naming the plugin and the name;
  so does a method named as a hook but not marked ``@hookimpl`` (pluggy would
  never call it: a method overriding a hookimpl needs the mark again).
  A plugin class whose ``__init__`` raises is a programming error naming the plugin.
* ``firstresult`` hooks stop at the first hookimpl that returns something other
  than None (hookimpls run newest-registered first; ``tryfirst``/``trylast``
  reorder them, as in pluggy). Other hooks collect every non-None answer.
  ``ksi_select_provider`` is the exception: the host decides the order (see it).
* Raising an :class:`~ksi_host.errors.OperationalError` (or a subclass) is an
  expected failure: it fails the request being handled (for request hooks) and
  flows into failure handling. Raising anything else is a programming error:
  the host lets it propagate with its traceback, adding a note that names the
  plugin and the hook. It is never swallowed. So is an answer of the wrong kind
  (a name where a Provider is due, True for a FailureDecision): a TypeError
  naming the plugin, the hook and what it returned (``ksi_host.hooks.ANSWERS``).
* Observer hooks (``ksi_attempt_finished``, ``ksi_request_finished``) cannot
  change anything: every implementation is called, and an OperationalError
  raised there is logged (naming the plugin) and does not change the result.
* Hookwrappers are not supported: one stops start-up, naming the plugin.

``host`` is the running :class:`ksi_host.Host`: ``host.db`` (the async SQLite
helper), ``host.config`` (each plugin's validated config table), ``host.clock``
and ``host.sleep`` (injectable time), ``host.execute`` (run one request now),
``host.executing`` (the ids of the requests whose ``host.execute`` is under
way), ``host.serve`` (False for read-only commands such as ``ksi-host usage``),
``host.resume`` (False: start no request stored by an earlier run; see
``ksi_startup``).

The order of the hooks of one request, as ``host.execute`` runs it::

    ksi_prepare_request                         once, before the first attempt
    for each attempt:
        ksi_select_provider                     (plugins asked in the host's order)
        ksi_admit                               may wait for room (windows: ksi_window_store); may refuse
        ksi_attempt_started                     durable before the call is sent
        Provider.complete                       one upstream call
        ksi_record_usage                        durable, before the result is final
        ksi_handle_failure                      only if the attempt failed
        ksi_attempt_finished                    observers
    ksi_request_finished                        observers, once, before the result is stored
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from .commands import Command
    from .errors import OperationalError
    from .models import (
        Attempt,
        AttemptContext,
        CompletionRequest,
        CompletionResult,
        FailureDecision,
        Provider,
        ProviderInfo,
        RequestQuery,
        Ticket,
        UpstreamCall,
    )
    from .service import Host
    from .windows import WindowStore

PROJECT = "ksi_host"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

#: Which distribution implements a hook, for the message when no plugin does.
INSTALL_HINTS: dict[str, str] = {
    "ksi_enqueue": "ksi-queue",
    "ksi_select_provider": "ksi-provider-litellm",
    "ksi_handle_failure": "ksi-retry",
    "ksi_record_usage": "ksi-tokens",
    "ksi_usage_report": "ksi-tokens",
    "ksi_cancel": "ksi-queue",
    "ksi_clear_session": "ksi-queue",
    "ksi_list_requests": "ksi-queue",
    "ksi_prepare_request": "ksi-sessions",
}

@hookspec
def ksi_config_spec() -> tuple[str, type] | None:
    """Declare the plugin's config table.

    Called once, before start-up, without arguments.

    Return ``(table_name, cls)``: ``cls`` is an attrs class whose fields (with
    type annotations and defaults) are the keys of ``[table_name]`` in the
    config file. The host validates the table against it — unknown keys and
    wrong types stop start-up with a :class:`~ksi_host.errors.ConfigError` that
    names the key — and makes the instance available as
    ``host.config[table_name]`` (built from defaults when the table is absent).
    Nested attrs classes, ``list[...]`` of them (TOML arrays of tables) and
    ``dict[str, ...]`` are supported; a field of a type TOML has not (``Path``,
    ``Decimal``, an Enum) needs an attrs ``converter``, which gets the TOML value
    as it is. A config class the host cannot read (an annotation naming nothing)
    is a programming error naming the plugin. Secrets never go in the file: name the
    environment variable that holds them (for example ``api_key_env``).

    Return None if the plugin has no config.
    """


@hookspec
def ksi_cli_commands() -> list[Command] | None:
    """Add sub-commands to ``ksi-host`` (as ``llm`` plugins do with ``register_commands``).

    Called without arguments when ``ksi-host`` parses its command line (also
    for ``--help``: keep it cheap, import heavy modules inside the command's
    ``run``). Return a list of :class:`ksi_host.commands.Command` (name, help,
    a function that adds the command's options to its argparse parser, and the
    coroutine function that runs it and returns the exit code), or None. A name
    that a built-in command or another plugin's command has stops ``ksi-host``
    with a usage error naming both.
    """


@hookspec
def ksi_exclusive_hooks(host: Host) -> list[str] | None:
    """Claim hooks that this plugin alone serves in this configuration.

    Called once after the config is validated (``host.config`` is set) and
    before start-up. Return the names of hooks this plugin takes over (for
    example a shared queue and ledger: ``ksi_enqueue``, ``ksi_cancel``,
    ``ksi_record_usage``, ...), or None. Other plugins' implementations of a
    claimed hook are then never called; a plugin that lost hooks to the claim
    and is left with nothing but housekeeping (``ksi_config_spec``,
    ``ksi_startup``, ``ksi_shutdown``, ``ksi_status``, ``ksi_cli_commands``)
    and observer hooks (``ksi_attempt_finished``, ``ksi_request_finished``)
    is not started at all (its config table is still accepted). Two plugins claiming one hook stop start-up
    (StartupError naming both). A plugin that is installed but not configured
    returns None and changes nothing.
    """


@hookspec
def ksi_startup(host: Host) -> None:
    """Open the plugin's resources.

    Called once when the host starts (``async with Host(...)``), after config
    validation and after ``host.db`` is open, in registration order. Create
    tables here with ``await host.db.migrate(name, [...])``; a queue restores
    unfinished work here and, when ``host.serve`` is true, starts running it.

    ``host.resume`` False (``ksi-host ask``): a serving queue runs only the
    requests submitted to this Host; those stored unfinished before it started
    stay stored as they are, not started (the next host that resumes runs
    them). ``ksi_enqueue`` refuses (ValidationError naming ``session_id``) a
    request whose session has such a request ahead of it: it could never
    start. A queue that cannot honour this raises StartupError.

    Returns nothing. Raising :class:`~ksi_host.errors.StartupError` stops start-up
    with its message; anything else is a programming error.
    """


@hookspec
def ksi_drain(host: Host) -> None:
    """Start no more requests; return once the running ones have their final results stored.

    Called by ``host.drain()`` (the first Ctrl-C of ``ksi-host run``, a server
    told to stop). A queue stops starting queued requests (they stay stored
    for the next start), lets the running ones finish (each bounded by its
    timeouts), stores their results and completes their tickets, then returns.
    Every implementation is called. Returns nothing.
    """


@hookspec
def ksi_shutdown(host: Host) -> None:
    """Close the plugin's resources.

    Called once when the host stops, in reverse registration order, before
    ``host.db`` is closed; also after a failed start-up for plugins whose
    ``ksi_startup`` ran. Stop background tasks and flush pending writes here.
    A queue must leave unfinished requests stored so a restart resumes them.

    Returns nothing.
    """


@hookspec(firstresult=True)
def ksi_enqueue(host: Host, request: CompletionRequest) -> Ticket | None:
    """Accept ``request`` (a :class:`~ksi_host.models.CompletionRequest`) into a queue.

    Called by ``host.submit``. Store the request durably, then return a
    :class:`~ksi_host.models.Ticket` whose ``result()`` the caller awaits. When
    the queue decides the request runs, it calls ``await host.execute(request,
    submitted_at=...)`` (unix seconds when it was accepted)
    (which selects a provider, calls it, handles failures and records usage),
    stores the final result, and completes the ticket with it. A result the
    queue makes itself (a cancel) is reported with
    ``await host.request_finished(request, result)`` so observers see it. A
    queue that cancels a running ``host.execute`` passes it ``attempts=[]``:
    the list then holds the attempts made so far, the one cut short (a
    ``Cancelled`` error) last, for the cancelled result's ``attempts`` (and
    ``provider``: the last attempt's).

    A request whose ``request_id`` already has a stored final result must not
    run again: return a ticket already done with the stored result. A request
    id that is queued or running returns a ticket for that same run.

    If ``host.execute`` raises (only programming errors do), complete the
    ticket with ``set_exception`` and leave the request stored as unfinished.

    Raise :class:`~ksi_host.errors.ValidationError` to refuse the request.
    firstresult: the first queue plugin that returns a ticket wins.
    Reference implementation: ``ksi-queue``.
    """


@hookspec
def ksi_prepare_request(host: Host, request: CompletionRequest) -> CompletionRequest | None:
    """Prepare ``request`` before its first attempt (for example, put a conversation's earlier turns first).

    Called once by ``host.execute`` when the queue runs the request, before the
    first provider is selected (a request's retries and failovers all send what
    this hook returned). Every implementation is called, in hook order; each
    receives the request as the one before it left it.

    Return a new request made with ``attrs.evolve`` (the ``request_id`` must
    stay the same), or None to leave it as it is. What is returned is what
    providers, the ledger and the observers (``ksi_request_finished`` too) see;
    the queue keeps the request as it was submitted. A plugin that puts earlier
    messages before the request's own sets ``history`` to their number
    (``attrs.evolve(request, messages=earlier + list(request.messages),
    history=request.history + len(earlier))``): a provider that keeps the
    conversation itself (the claude CLI's ``--resume``) then sends only
    ``messages[history:]`` when it resumes its own conversation, so the
    conversation has one source, never two.

    A request with ``continue_session`` set is refused (MissingPluginError
    naming ``ksi-sessions``) when no plugin implements this hook: without one,
    its earlier turns would silently not be sent.

    Raising an OperationalError ends the request with an error result (no
    attempt is made; ``ksi_request_finished`` is still called). Anything else
    is a programming error.
    Reference implementation: ``ksi-sessions``.
    """


@hookspec(firstresult=True)
def ksi_select_provider(host: Host, request: CompletionRequest, exclude: frozenset[str]) -> Provider | None:
    """Choose this plugin's provider (deployment) for the next attempt of ``request``.

    Called by ``host.execute`` before every attempt. ``exclude`` is a frozenset
    of provider names that already failed this request and must not be chosen.
    A plugin answers only for its own deployments.

    Return an object satisfying :class:`~ksi_host.models.Provider` (``name``,
    ``timeout_s``, ``async complete(request, *, timeout_s)``), or None when this
    plugin serves no usable deployment for ``request.model``.

    Raise a retryable :class:`~ksi_host.errors.ProviderUnavailable` (with
    ``retry_after``, the shortest cool-down left) when this plugin's deployments
    serve the model but are all behind open circuits (or their half-open trial
    is in flight).

    Which plugin is asked first is the host's policy, from facts the plugins
    declare: the host asks the plugins whose ``ksi_list_providers`` lists
    deployments for the model in the order of those deployments' lowest
    ``ProviderInfo.priority`` (ties: by plugin name), then plugins that list none
    for it, in hook order. The first provider returned is used. A plugin that
    raises ProviderUnavailable is passed over for the next; when no plugin
    returns a provider, the request fails with that ProviderUnavailable (the
    failure policy then waits and tries again) or, if none raised, with
    :class:`~ksi_host.errors.NoProviderError` naming the model.

    ``Provider.complete`` makes exactly one upstream attempt (no retries of its
    own) and raises OperationalErrors for failures. A provider plugin keeps its
    own circuit state from what its providers' calls return or raise
    (:class:`ksi_host.providers.DeploymentProvider` does that around the
    plugin's own ``attempt``).
    Reference implementation: ``ksi-provider-litellm``.
    """


@hookspec
def ksi_list_providers(host: Host, model: str | None) -> list[ProviderInfo]:
    """Describe the providers (deployments) this plugin serves.

    Called by the host to rank provider plugins for a model (once per model
    name while the host runs), by the failure policy (is there another
    deployment for this model?), by ``ksi-host status`` and to name the
    configured models in a NoProviderError. ``model`` is a requested model
    name, or None for all.

    Return a list of :class:`~ksi_host.models.ProviderInfo` (name, model or
    pattern, plugin, circuit ``state``, ``priority``) for the deployments that
    serve ``model``, in the order they would be tried. Must not make network
    calls.
    """


@hookspec
def ksi_admit(host: Host, request: CompletionRequest, provider: Provider, attempt: int) -> None:
    """Let attempt number ``attempt`` of ``request`` go to ``provider``, when the limits allow it.

    Called by ``host.execute`` after a provider is selected and before the
    attempt is recorded and sent; every implementation is called, in hook order.
    Return (None) once the attempt may be sent. To hold it back until a window
    has room, wait (``await``) before returning: the request keeps its place in
    its session, and the wait is not an attempt and not a failure. The host
    never lets the wait pass the request's deadline (the request then ends with
    :class:`~ksi_host.errors.DeadlineExceeded`).

    Raise an OperationalError to refuse the attempt (for example
    :class:`~ksi_host.errors.BudgetExceeded`): the request ends with that error
    unless the failure policy decides to retry. Every call of this hook that
    returned is followed by exactly one ``ksi_attempt_finished`` for the same
    request and attempt number (with the usage it reported, to true up a
    reservation), whatever happens after it.
    """


@hookspec(firstresult=True)
def ksi_window_store(host: Host) -> WindowStore | None:
    """Offer the store of rate windows, when this plugin keeps state shared by several hosts.

    Called by a rate-limiting plugin (ksi-limits) once, in its ``ksi_startup``
    (so possibly before this plugin's own ``ksi_startup`` has run: the store
    must accept calls only from the first admission on, after every plugin
    started). Return an object satisfying
    :class:`~ksi_host.windows.WindowStore` (``take``, ``settle``, ``release``,
    ``seed``, ``snapshot``, ``poll_s``, ``shared``) whose windows every host on
    the same shared state sees, or None (not configured for sharing): the
    limiting plugin then keeps its windows in its own process.

    Raising a :class:`~ksi_host.errors.StartupError` stops start-up with its
    message; anything else is a programming error.
    firstresult. Reference implementation: ``ksi-postgres``.
    """


@hookspec
def ksi_attempt_started(host: Host, request: CompletionRequest, call: UpstreamCall) -> None:
    """Record that an upstream call is about to be sent.

    Called by ``host.execute`` right before ``Provider.complete``, after
    admission. ``call`` is an :class:`~ksi_host.models.UpstreamCall` with
    ``outcome="sent"`` and no usage yet; its ``call_id`` comes back in
    ``ksi_record_usage`` when the call ends. Make the record durable before
    returning (group commit is fine): if the process dies during the call, the
    record shows a call whose outcome nobody saw (a restart may turn it into
    ``unknown``: it may have been answered and billed).

    Returns nothing. Every implementation is called. Raising an
    OperationalError fails the attempt before anything is sent; a
    DatabaseError (the row could not be written) is not the attempt's
    outcome: ``host.execute`` raises it, and the queue keeps the request
    stored unfinished. Reference implementation: ``ksi-tokens``.
    """


@hookspec
def ksi_record_usage(host: Host, request: CompletionRequest, call: UpstreamCall) -> None:
    """Record how one upstream call ended.

    Called by ``host.execute`` for every call announced by
    ``ksi_attempt_started`` (same ``call_id``), before the request's result is
    final. ``call`` is an :class:`~ksi_host.models.UpstreamCall`: request id,
    attempt number (from 1), provider, model, :class:`~ksi_host.models.Usage`
    (None when the upstream reported none), latency, and ``outcome``: ``ok``,
    the error type of a failed call, or ``unknown`` when the host stopped
    waiting after sending it (a timeout, or a cancel while in flight: the
    upstream may still have answered and billed it). Make the record durable
    before returning (group commit is fine: return once the batch is committed).

    Returns nothing. Every implementation is called.
    Reference implementation: ``ksi-tokens``.
    """


@hookspec(firstresult=True)
def ksi_handle_failure(
    host: Host, request: CompletionRequest, error: OperationalError, attempt: AttemptContext
) -> FailureDecision | None:
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

    ``error.retry_after`` (on RateLimited and ProviderUnavailable, seconds or
    None) is the upstream's own "not before": a floor under any backoff, never
    a ceiling.

    With no plugin implementing this hook, a failed attempt is final (the
    error message says which plugin to install).
    firstresult. Reference implementation: ``ksi-retry``.
    """


@hookspec
def ksi_attempt_finished(
    host: Host, request: CompletionRequest, attempt: Attempt, error: OperationalError | None, call: UpstreamCall | None
) -> None:
    """Observe one finished attempt, whatever its outcome (an observer hook).

    Called by ``host.execute`` after every attempt: after ``ksi_record_usage``
    and, for a failed attempt, after ``ksi_handle_failure`` decided (so
    ``attempt.delay_s`` is the wait before the next attempt, None for the last).
    ``attempt`` is an :class:`~ksi_host.models.Attempt` (number, provider or
    None when none was selected, error, delay, latency, ``ttft_ms`` when
    streamed); ``error`` is the OperationalError that ended it, or None when it
    succeeded; ``call`` is the upstream call as ``ksi_record_usage`` received it
    (its usage, or None when the upstream reported none; its ``created_at`` is
    when it was sent), or None when nothing was sent (no provider, refused by
    admission). Also called, with :class:`~ksi_host.errors.Cancelled`, for an
    attempt cut short by a cancel (its call's outcome ``unknown``).

    Returns nothing. Every implementation is called; an OperationalError raised
    here is logged and changes nothing.
    """


@hookspec
def ksi_request_finished(host: Host, request: CompletionRequest, result: CompletionResult) -> None:
    """Observe a request's final result, whatever its status (an observer hook).

    Called once per final result: by ``host.execute`` (``ok`` or ``error``,
    including requests refused before any attempt, such as a model nothing
    serves), after the last ``ksi_attempt_finished`` and before the queue
    stores the result; and by the queue for results it makes itself
    (``cancelled``), through ``host.request_finished``. ``request`` is the
    request as ``ksi_prepare_request`` left it when the host ran it.

    Returns nothing. Every implementation is called; an OperationalError raised
    here is logged and changes nothing.
    """


@hookspec(firstresult=True)
def ksi_usage_report(host: Host, by: str, since: float | None) -> list[dict[str, Any]] | None:
    """Summarise recorded usage.

    Called by ``host.usage_report`` and ``ksi-host usage``. ``by`` is one of
    ``model``, ``agent``, ``session``, ``purpose``, ``provider``, ``day``, or
    ``total`` (one row, key None, summing everything: a request that failed over
    between two providers counts once there, though once in each provider's
    row); ``since`` is unix seconds or None for all time.

    Return a list of dicts, one per group, each with at least ``key``,
    ``calls``, ``requests``, ``prompt_tokens``, ``completion_tokens``,
    ``total_tokens``, ``cost_usd`` (None when no call's cost was known).
    Raise ValidationError for an unknown ``by``.
    firstresult. Reference implementation: ``ksi-tokens``.
    """


@hookspec
def ksi_status(host: Host) -> dict[str, Any] | None:
    """Report this plugin's state for ``ksi-host status`` and ``host.status()``.

    Return a dict ``{section_name: json_serialisable_data}`` (for example
    ``{"queue": {...}}`` or ``{"circuits": [...]}``), or None. The host merges
    the sections of every plugin.
    """


@hookspec
def ksi_request_details(host: Host, request_id: str) -> dict[str, Any] | None:
    """What this plugin knows of one request, for ``ksi-host show``, ``host.request_details`` and an HTTP
    ``GET /v1/requests/{id}``.

    Return ``{section: json_serialisable_data}``, or None when this plugin
    does not know the request. A queue answers ``request`` (the request's
    fields as ``CompletionRequest.to_dict`` gives them, messages included),
    ``state`` (``queued``, ``running`` or the final status), ``submitted_at``
    and ``result`` (``CompletionResult.to_dict``, attempts included; None
    while unfinished); a ledger answers ``calls`` (its rows for the request).
    The host merges every plugin's sections; no section at all means nobody
    knows the request. Read only: no network, no writes.
    """


@hookspec(firstresult=True)
def ksi_list_requests(host: Host, query: RequestQuery) -> list[dict[str, Any]] | None:
    """Recent requests, newest first, for ``ksi-host logs``.

    ``query`` is a :class:`~ksi_host.models.RequestQuery`: at most ``limit``
    requests, only those of ``session_id``, ``agent_id``, ``model`` or with
    ``status`` (``queued``, ``running``, ``ok``, ``error``, ``cancelled``) when
    set, submitted at or after ``since`` (unix seconds). Return a list of dicts
    with at least ``request_id``, ``session_id``, ``agent_id``, ``model``,
    ``status``, ``attempts`` (a count), ``total_tokens``, ``cost_usd``,
    ``latency_ms`` (submission to final result; None while unfinished),
    ``submitted_at``. Must stay fast on a database of a million requests.
    firstresult. Reference implementation: ``ksi-queue``.
    """


@hookspec(firstresult=True)
def ksi_cancel(host: Host, request_id: str) -> bool | None:
    """Cancel one request.

    Called by ``host.cancel``. A queued request ends with status ``cancelled``
    (its ticket completes with that result, which is stored); a running one
    too, its result keeping the attempts made (see ``ksi_enqueue``). Return True if
    the request was found and cancelled, False if it was found but is already
    final, None if this plugin does not know it.
    firstresult. Reference implementation: ``ksi-queue``.
    """


@hookspec(firstresult=True)
def ksi_clear_session(host: Host, session_id: str) -> int | None:
    """Cancel every queued request of ``session_id``.

    Called by ``host.clear_session``. Queued requests end with status
    ``cancelled``; the running one finishes. Return how many were cancelled.
    firstresult. Reference implementation: ``ksi-queue``.
    """
