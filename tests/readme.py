"""The code blocks of the README, for the tests that run them as shown."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def snippets(language: str) -> list[str]:
    """The fenced code blocks of the README in ``language`` (```python ... ```), in order."""
    return re.findall(rf"^```{language}\n(.*?)^```$", README.read_text(encoding="utf-8"), flags=re.S | re.M)


def snippet(language: str, containing: str) -> str:
    """The one block in ``language`` that contains ``containing``."""
    found = [s for s in snippets(language) if containing in s]
    assert len(found) == 1, f"{len(found)} README {language} blocks contain {containing!r}"
    return found[0]


PYTHON_SNIPPETS = {
    "asyncio.run(main())": "tests/integration/test_readme.py (needs the four plugins)",
    "def test_my_policy(make_host)": "tests/test_readme.py (an outside project, strict mode)",
    "class EchoProvider": "tests/test_readme.py",
    "class TestMyProviderConformance": "tests/test_readme.py (an outside project, strict mode, tests/tiny_provider.py)",
    "from ksi_host.providers import (": "tests/test_readme.py (the provider kit's public names import)",
    'base_url="http://127.0.0.1:8787/v1"': "tests/integration/test_serve_readme.py (against ksi-host serve)",
}
"""Each Python block of the README, by a line it holds, and the test that runs it."""
