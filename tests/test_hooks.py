import pluggy
import pytest

from ksi_host import RateLimited, hookimpl, hookspecs
from ksi_host.hooks import HookCaller


def caller(*plugins):
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for p in plugins:
        pm.register(p)
    return HookCaller(pm)


class Answer(str):
    """A provider (the hook's answer must be one) that compares as its name."""

    timeout_s = None

    @property
    def name(self):
        return str(self)

    async def complete(self, request, *, timeout_s):
        raise NotImplementedError


class AsyncNone:
    @hookimpl
    async def ksi_select_provider(self, request, exclude):
        return None


class SyncAnswer:
    @hookimpl
    def ksi_select_provider(self, request):
        return Answer("sync")


class AsyncAnswer:
    @hookimpl
    async def ksi_select_provider(self, exclude):
        return Answer(f"async {sorted(exclude)}")


async def test_firstresult_awaits_async_none_before_moving_on():
    # newest registered is called first: AsyncNone, then SyncAnswer
    assert await caller(SyncAnswer(), AsyncNone()).first("ksi_select_provider", host=None, request=1, exclude=frozenset()) == "sync"


async def test_async_answer_is_awaited_and_collected():
    c = caller(SyncAnswer(), AsyncAnswer(), AsyncNone())
    assert await c.first("ksi_select_provider", host=None, request=1, exclude=frozenset({"x"})) == "async ['x']"
    assert await c.call("ksi_select_provider", host=None, request=1, exclude=frozenset()) == ["async []", "sync"]


class Crashes:
    @hookimpl
    async def ksi_status(self, host):
        return {}["missing"]


class Operational:
    @hookimpl
    def ksi_status(self):
        raise RateLimited("expected")


async def test_programming_error_propagates_naming_plugin_and_hook():
    c = caller()
    c.pm.register(Crashes(), name="crashy")
    with pytest.raises(KeyError) as e:
        await c.call("ksi_status", host=None)
    assert "raised by plugin 'crashy' in hook ksi_status" in e.value.__notes__
    assert e.traceback[-1].name == "ksi_status"  # the original traceback is kept


async def test_operational_error_passes_unchanged():
    with pytest.raises(RateLimited) as e:
        await caller(Operational()).call("ksi_status", host=None)
    assert not getattr(e.value, "__notes__", None)


def test_every_hook_has_a_manual():
    specs = [n for n in dir(hookspecs) if n.startswith("ksi_")]
    assert len(specs) >= 12
    for name in specs:
        doc = getattr(hookspecs, name).__doc__ or ""
        assert len(doc.split()) > 25, f"{name} needs a real docstring"
        assert "Return" in doc or "return" in doc, name
