"""Loading the plugin must not import litellm (it takes seconds)."""

from __future__ import annotations

import subprocess
import sys


def test_importing_the_plugin_does_not_import_litellm() -> None:
    code = (
        "import sys, time; t = time.perf_counter(); import ksi_provider_litellm.plugin as p; "
        "dt = time.perf_counter() - t; "
        "print(dt, 'litellm' in sys.modules, 'openai' in sys.modules, 'httpx' in sys.modules); p.Plugin()"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    seconds, litellm, openai, httpx = float(out[0]), out[1], out[2], out[3]
    assert (litellm, openai, httpx) == ("False", "False", "False")
    assert seconds < 1.0


def test_plugin_loads_through_its_entry_point_without_litellm() -> None:
    code = (
        "import sys; from importlib.metadata import entry_points; "
        "ep = [e for e in entry_points(group='ksi_host') if e.name == 'litellm'][0]; "
        "cls = ep.load(); cls(); print(ep.value, 'litellm' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["ksi_provider_litellm.plugin:Plugin", "False"]
