"""The README's Python snippets run as shown: the plugin-testing example in an outside project
(its own pyproject, pytest-asyncio in its default strict mode), the provider example as a script."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

from readme import PYTHON_SNIPPETS, snippet, snippets


def test_every_python_snippet_has_a_test_that_runs_it():
    blocks = snippets("python")
    assert len(blocks) == len(PYTHON_SNIPPETS)
    for block in blocks:
        assert sum(key in block for key in PYTHON_SNIPPETS) == 1, block


def test_the_plugin_testing_example_passes_in_an_outside_project_in_strict_mode(tmp_path: Path):
    project = tmp_path / "my-policy"
    (project / "tests").mkdir(parents=True)
    (project / "pyproject.toml").write_text(textwrap.dedent("""\
        [project]
        name = "my-policy"
        version = "0.1"

        [tool.pytest.ini_options]
        testpaths = ["tests"]
        """))  # no asyncio_mode: pytest-asyncio's default, strict
    (project / "tests" / "test_my_policy.py").write_text(snippet("python", "def test_my_policy(make_host)"))
    p = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider"], cwd=project,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "asyncio: mode=Mode.STRICT" in p.stdout and "1 passed" in p.stdout


def test_the_conformance_example_passes_against_the_tiny_provider_in_strict_mode(tmp_path: Path):
    project = tmp_path / "my-provider"
    (project / "tests").mkdir(parents=True)
    (project / "pyproject.toml").write_text('[project]\nname = "my-provider"\nversion = "0.1"\n')  # strict mode
    (project / "my_provider.py").write_text((Path(__file__).parent / "tiny_provider.py").read_text())
    (project / "tests" / "test_conformance.py").write_text(snippet("python", "class TestMyProviderConformance"))

    def pytest_there() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--rootdir", str(project)],
                              cwd=project, capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHONPATH": str(project)})

    p = pytest_there()
    assert p.returncode == 0, p.stdout + p.stderr
    assert re.search(r"\b4\d passed\b", p.stdout), p.stdout  # the whole suite ran, under strict mode
    # and it fails a provider that gets something wrong: the same one, sending another key than the variable's
    source = (project / "my_provider.py").read_text()
    assert source.count("Bearer {key}") == 1
    (project / "my_provider.py").write_text(source.replace("Bearer {key}", "Bearer sk-another-key"))
    p = pytest_there()
    assert p.returncode == 1 and "FAILED tests/test_conformance.py::TestMyProviderConformance::test_a_plain_completion" \
        in p.stdout and "1 failed" in p.stdout, p.stdout


def test_the_provider_example_runs(tmp_path: Path):
    p = subprocess.run([sys.executable, "-c", snippet("python", "class EchoProvider")], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr


def test_the_provider_kits_imports_run():
    p = subprocess.run([sys.executable, "-c", snippet("python", "from ksi_host.providers import (")],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr


def test_the_plugin_tables_name_each_plugin_as_its_entry_point_does():
    """The "plugin name" column is what `ksi-host plugins` prints, `KSI_HOST_PLUGINS` takes and the config
    table is called: each plugin's entry-point name in its own pyproject.toml."""
    import tomllib

    root = Path(__file__).resolve().parents[1]
    rows = re.findall(r"^\| `([\w-]+)` \(`plugins/([\w-]+)`\) \| `([\w-]+)` \|", (root / "README.md").read_text(), flags=re.M)
    assert len(rows) == len(list((root / "plugins").glob("*/pyproject.toml"))), rows
    for distribution, folder, name in rows:
        project = tomllib.loads((root / "plugins" / folder / "pyproject.toml").read_text())
        assert project["project"]["name"] == distribution
        assert list(project["project"]["entry-points"]["ksi_host"]) == [name], (folder, name)


def test_no_readme_installs_a_plugin_from_a_package_index():
    """The plugins are not on a package index: ``pip install ksi-limits`` fails for a new user. Every README
    installs them from the checkout (``pip install -e plugins/limits``)."""
    root = Path(__file__).resolve().parents[1]
    for readme in [root / "README.md", *sorted((root / "plugins").glob("*/README.md"))]:
        text = re.sub(r"\s*\n\s*", " ", readme.read_text())  # a command cut over two lines too
        found = re.findall(r"pip install (?:ksi-[\w-]+|ksi-host\[)", text)
        assert not found, (readme.relative_to(root), found)
