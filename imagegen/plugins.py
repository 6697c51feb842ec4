"""The plugin host: a pluggy manager over the entry-point group "imagegen", built on first use."""

from __future__ import annotations

import importlib.metadata as md
import os
import warnings
from dataclasses import dataclass, field

import pluggy

from . import hookspecs

ENTRY_POINT_GROUP = "imagegen"

_manager: pluggy.PluginManager | None = None


@dataclass
class PluginInfo:
    name: str  # the entry point's name, e.g. "flux2"
    distribution: str  # the pip distribution, e.g. "imagegen-flux2"
    version: str
    module: object | None = None
    error: str | None = None  # set when the plugin failed to load
    models: list[str] = field(default_factory=list)

    @property
    def hooks(self) -> list[str]:
        names = ("register_models", "register_commands", "register_block_loop_options")
        return [n for n in names if self.module is not None and hasattr(self.module, n)]


_infos: dict[str, PluginInfo] = {}


def _allowed_distributions() -> set[str] | None:
    """IMAGEGEN_LOAD_PLUGINS: comma list of distribution names; set but empty loads none."""
    value = os.environ.get("IMAGEGEN_LOAD_PLUGINS")
    if value is None:
        return None
    return {_normalize(v) for v in value.split(",") if v.strip()}


def _normalize(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def build_plugin_manager() -> pluggy.PluginManager:
    """Create a manager and load every allowed entry point; a broken plugin is a warning, not fatal."""
    pm = pluggy.PluginManager("imagegen")
    pm.add_hookspecs(hookspecs)
    _infos.clear()
    allowed = _allowed_distributions()
    for ep in md.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist else ep.name
        if allowed is not None and _normalize(dist) not in allowed:
            continue
        info = PluginInfo(name=ep.name, distribution=dist, version=ep.dist.version if ep.dist else "")
        _infos[ep.name] = info
        try:
            info.module = ep.load()
            pm.register(info.module, name=ep.name)
        except Exception as e:  # any import-time failure of third-party code
            info.module, info.error = None, f"{type(e).__name__}: {e}"
            warnings.warn(f"imagegen: plugin '{dist}' failed to load and is skipped ({info.error})", stacklevel=2)
    return pm


def get_plugin_manager() -> pluggy.PluginManager:
    global _manager
    if _manager is None:
        _manager = build_plugin_manager()
    return _manager


def register_plugin(module: object, name: str, distribution: str = "", version: str = "") -> None:
    """Register an in-process plugin (tests, notebooks); the registry is rebuilt on next use."""
    from . import registry  # built from the plugins: rebuilt after one is added

    pm = get_plugin_manager()
    if pm.get_plugin(name) is not module:
        pm.register(module, name=name)
    _infos[name] = PluginInfo(name, distribution or name, version, module)
    registry.invalidate()


def unregister_plugin(name: str) -> None:
    from . import registry  # built from the plugins: rebuilt after one is added

    pm = get_plugin_manager()
    plugin = pm.get_plugin(name)
    if plugin is not None:
        pm.unregister(plugin, name=name)
    _infos.pop(name, None)
    registry.invalidate()


def plugin_infos() -> list[PluginInfo]:
    """Every plugin found (loaded or broken), with the model ids each registered."""
    from . import registry  # built from the plugins: rebuilt after one is added

    get_plugin_manager()
    registry.all_specs()  # fills PluginInfo.models
    return sorted(_infos.values(), key=lambda i: i.name)


def plugin_info(name: str) -> PluginInfo | None:
    return _infos.get(name)


def reset() -> None:
    """Forget the manager and registry so the next use reloads entry points (tests)."""
    global _manager
    from . import registry  # built from the plugins: rebuilt after one is added

    _manager = None
    _infos.clear()
    registry.invalidate()
