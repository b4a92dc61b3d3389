"""The provider kit is public: its names, and the provider plugins' code and READMEs using only them."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
from pathlib import Path

import pytest

import ksi_host.providers as kit

ROOT = Path(__file__).resolve().parents[1]
PROVIDER_PLUGINS = ["provider", "provider-openai", "provider-claude-cli"]
READMES = [ROOT / "README.md"] + [ROOT / "plugins" / p / "README.md" for p in PROVIDER_PLUGINS]
LISTED_MODULES = {"ksi_host", "ksi_host.chat", "ksi_host.commands", "ksi_host.config", "ksi_host.db", "ksi_host.errors",
                  "ksi_host.hookspecs", "ksi_host.models", "ksi_host.providers", "ksi_host.testing", "ksi_host.windows"}
"""The public API the README lists for plugin authors."""
PUBLIC_MODULES = LISTED_MODULES | {
    f"ksi_host.providers.{m}" for m in ("circuit", "circuit_store", "config", "deployment_provider", "deployments",
                                        "errormap", "plugin", "validators")}
README_MODULES = {"ksi_host", "ksi_host.providers", "ksi_host.providers.validators", "ksi_host.testing",
                  "ksi_host.testing.conformance"}
"""Where a README snippet may import from (not ``ksi_host.providers.deployments``: DEFAULT_PRIORITY came from there)."""
GONE = re.compile(r"select_ranked|outranking|outranks|tryfirst|deployments\.ordered")


def test_the_kit_names_its_public_api() -> None:
    assert set(kit.__all__) >= {"ProviderPlugin", "ProviderConfig", "Deployment", "DeploymentPool", "DeploymentProvider",
                                "CircuitBreaker", "CircuitConfig", "CircuitStore", "DEFAULT_PRIORITY",
                                "deployments_field", "check_keys", "error_for_status", "redact", "validators"}
    for name in kit.__all__:
        assert getattr(kit, name) is not None, name
    for module in PUBLIC_MODULES - {"ksi_host", "ksi_host.testing"}:
        importlib.import_module(module)


def test_persistence_and_dead_code_left_the_pool_and_the_breaker() -> None:
    for gone in ("attach", "flush", "detach", "_mark", "_flush_dirty"):
        assert not hasattr(kit.DeploymentPool, gone), gone
    for gone in ("available", "snapshot"):
        assert not hasattr(kit.CircuitBreaker, gone), gone


def _plugin_sources() -> list[Path]:
    return sorted(p for name in PROVIDER_PLUGINS for p in (ROOT / "plugins" / name).glob("ksi_*/*.py"))


@pytest.mark.parametrize("path", _plugin_sources(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_provider_plugins_import_only_public_names(path: Path) -> None:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ksi_host"):
            assert node.module in PUBLIC_MODULES, f"{path.name}: imports from {node.module}"
            for alias in node.names:
                assert not alias.name.startswith("_"), f"{path.name}: imports {alias.name} from {node.module}"
                assert hasattr(importlib.import_module(node.module), alias.name), alias.name
        if isinstance(node, ast.ClassDef):
            for item in node.body:  # the providers' unused "plugin = ..." attributes are gone
                if isinstance(item, ast.Assign):
                    assert [getattr(t, "id", None) for t in item.targets] != ["plugin"], f"{path.name}: {node.name}.plugin"
    docstring = ast.get_docstring(tree) or ""
    assert not GONE.search(docstring), f"{path.name}: {GONE.search(docstring).group()}"  # type: ignore[union-attr]


def _every_plugins_sources() -> list[Path]:
    return sorted(p for p in (ROOT / "plugins").glob("*/ksi_*/**/*.py") if "egg-info" not in str(p))


@pytest.mark.parametrize("path", _every_plugins_sources(), ids=lambda p: str(p.relative_to(ROOT / "plugins")))
def test_every_plugin_imports_only_the_public_api(path: Path) -> None:
    """The rule every plugin follows (README, "Writing a plugin"): only the listed modules of ksi_host, no private
    name, never another plugin."""
    own = path.relative_to(ROOT / "plugins").parts[1]
    others = {p.name for p in (ROOT / "plugins").glob("*/ksi_*") if p.is_dir() and "egg-info" not in p.name} - {own}
    for node in ast.walk(ast.parse(path.read_text())):
        modules = ([a.name for a in node.names] if isinstance(node, ast.Import)
                   else [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
        for module in modules:
            if module.startswith("ksi_host"):
                assert module in PUBLIC_MODULES, f"imports {module}"
                for alias in getattr(node, "names", []) if isinstance(node, ast.ImportFrom) else []:
                    assert not alias.name.startswith("_"), f"imports {alias.name} from {module}"
            assert module.split(".")[0] not in others, f"imports another plugin: {module}"


def test_the_readme_lists_the_public_modules() -> None:
    section = (ROOT / "README.md").read_text().split("## Writing a plugin", 1)[1].split("\n## ", 1)[0]
    listed = re.search(r"Import only `ksi_host`'s public API \(([^)]*)\)", section)
    assert listed is not None
    assert set(re.findall(r"`(ksi_host[\w.]*)`", listed.group(1))) == LISTED_MODULES


def _snippets(readme: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", readme.read_text(), re.DOTALL)


@pytest.mark.parametrize("readme", READMES, ids=lambda p: str(p.relative_to(ROOT)))
def test_readmes_use_only_public_names_and_the_hosts_ranking(readme: Path) -> None:
    text = readme.read_text()
    found = GONE.search(text)
    assert found is None, f"{readme.name} still describes {found.group()}"  # the host orders provider plugins now
    for snippet in _snippets(readme):
        assert not re.search(r"validator=_\w", snippet), snippet  # private validators such as _opt_str
        for line in snippet.splitlines():
            m = re.match(r"\s*from (ksi_host[\w.]*) import \(?([\w, ]*)", line)
            if m is None:
                continue
            assert m.group(1) in README_MODULES, line
            module = importlib.import_module(m.group(1))
            for name in filter(None, (n.strip() for n in m.group(2).split(","))):
                assert not name.startswith("_") and hasattr(module, name), f"{readme.name}: {line.strip()}"


def test_the_walk_through_imports_what_its_snippets_use() -> None:
    walk = (ROOT / "plugins" / "provider-openai" / "README.md").read_text().split("# Writing a provider plugin", 1)[1]
    snippets = _snippets_of(walk)
    config, provider, plugin = (next(s for s in snippets if word in s) for word in
                                ("class OpenAIConfig", "class OpenAIProvider", "class Plugin"))
    assert "from ksi_host.providers import Deployment, ProviderConfig, deployments_field" in config
    assert "from ksi_host.providers import DeploymentProvider, connection_error, error_for_status" in provider
    assert "from ksi_host.providers import CircuitBreaker, ProviderPlugin" in plugin


def _snippets_of(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.DOTALL)


def test_the_readme_lists_every_module_it_sends_plugin_authors_to() -> None:
    section = (ROOT / "README.md").read_text().split("## Writing a plugin", 1)[1].split("\n## ", 1)[0]
    listed = re.search(r"Import only `ksi_host`'s public API \(([^)]*)\)", section)
    assert listed is not None
    public = set(re.findall(r"`(ksi_host[\w.]*)`", listed.group(1)))
    named = {m for m in (".".join(m.split(".")[:2]) for m in re.findall(r"\bksi_host\.[a-z_]+", section))
             if importlib.util.find_spec(m) is not None}  # modules, not names (ksi_host.hookimpl)
    assert named <= public, f"named for plugin authors but not in the public list: {sorted(named - public)}"
