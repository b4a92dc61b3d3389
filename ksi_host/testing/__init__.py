"""The testing kit for plugin authors.

Installed with ``pip install ksi-host[testing]``; the pytest plugin
(:mod:`ksi_host.testing.pytest_plugin`, registered through ``pytest11``) gives
the ``make_host`` fixture: a Host built from an explicit list of plugin
objects (no entry points) on a temporary database, so one hook can be tested
alone. :mod:`ksi_host.testing.fakes` holds small stand-in plugins;
:mod:`ksi_host.testing.server` an OpenAI-compatible server with fault modes, and
:mod:`ksi_host.testing.faults` the error each failing mode must become in a
provider plugin; :mod:`ksi_host.testing.chat` a value for every chat parameter (what a
provider plugin must send as it is); :mod:`ksi_host.testing.conformance` the tests every provider plugin
passes, as a class its tests subclass (:class:`~ksi_host.testing.conformance.ProviderConformance`).
"""

from .fakes import DirectQueue, FailOver, FakeClock, FakeProvider, FakeStreamingProvider, ScriptedProviders, UsageCalls

__all__ = ["DirectQueue", "FailOver", "FakeClock", "FakeProvider", "FakeStreamingProvider", "ScriptedProviders",
           "UsageCalls"]
