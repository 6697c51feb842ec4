"""Scale-out on Ray (the optional extra `imagegen-mlx[ray]`): batch workers (imagegen.scaleout.batch) and Ray Serve
replicas (imagegen.scaleout.serve). Nothing here imports Ray until a cluster is asked for.

Workers are separate processes, possibly on other hosts: they find entry-point plugins as usual (install
imagegen and its plugins on every node), and plugins registered in this process with
`imagegen.plugins.register_plugin` are registered in every worker too (`forwarded_plugins`).
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import importlib.util
import os
import sys
import types
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ImagegenError, install_hint

# the driver's settings that workers share (IMAGEGEN_FUSED_KERNELS=0 selects the plain-MLX path everywhere)
SHARED_ENV = ("IMAGEGEN_LOAD_PLUGINS", "IMAGEGEN_MODEL", "IMAGEGEN_DEBUG", "IMAGEGEN_FUSED_KERNELS")


def require_ray(serve: bool = False) -> None:
    """One clear line when the extra is missing, instead of an ImportError traceback."""
    needed = ("ray", "ray.serve") if serve else ("ray",)
    try:
        missing = [name for name in needed if importlib.util.find_spec(name) is None]
    except ModuleNotFoundError:  # find_spec("ray.serve") imports ray first
        missing = ["ray"]
    if missing:
        raise ImagegenError(f"Scaling out needs Ray: install it with {install_hint('ray')}.")


def connect(address: str | None, quiet: bool = False) -> bool:
    """Join or start a Ray cluster; True when this call started it (the caller shuts it down).

    `address`: "local" starts a cluster on this machine, "auto" joins the one `ray start` runs here (or
    $RAY_ADDRESS), anything else is a cluster address ("10.0.0.5:6379", "ray://head:10001"). A process
    that already called ray.init keeps its cluster."""
    import ray

    if ray.is_initialized():
        return False
    options: dict[str, Any] = {"log_to_driver": not quiet, "configure_logging": not quiet}
    if address in (None, "", "local"):
        options["include_dashboard"] = False
        address = "local"
    try:
        ray.init(address=address, **options)
    except ConnectionError as e:
        raise ImagegenError(f"Cannot reach a Ray cluster at '{address}': {e}") from None
    return True


@dataclass(frozen=True)
class PluginRef:
    """An in-process plugin, as a worker re-creates it: import `module` (from `path`), register it."""

    module: str
    name: str
    distribution: str
    version: str
    path: str  # the sys.path entry the module was imported from


def _import_root(module: types.ModuleType) -> str | None:
    """The sys.path entry a module was imported from (where its top-level package lives)."""
    top = sys.modules.get(module.__name__.split(".")[0])
    file = getattr(top, "__file__", None)
    if file is None:
        return None
    path = Path(file).resolve()
    return str(path.parent.parent if path.name == "__init__.py" else path.parent)


def forwarded_plugins() -> list[PluginRef]:
    """Plugins registered in this process that workers would not find through entry points."""
    from .. import plugins

    from_entry_points = {ep.name for ep in md.entry_points(group=plugins.ENTRY_POINT_GROUP)}
    refs = []
    for info in plugins.plugin_infos():
        if info.name in from_entry_points or info.module is None:
            continue
        root = _import_root(info.module) if isinstance(info.module, types.ModuleType) else None
        if root is None:
            warnings.warn(
                f"imagegen: plugin '{info.name}' is not an importable module; Ray workers will not have it",
                stacklevel=2,
            )
            continue
        refs.append(PluginRef(info.module.__name__, info.name, info.distribution, info.version, root))
    return refs


def setup_worker(refs: list[PluginRef]) -> None:
    """In a worker process: register the driver's in-process plugins."""
    from .. import plugins

    for ref in refs:
        if ref.path not in sys.path and Path(ref.path).is_dir():
            sys.path.append(ref.path)
        plugins.register_plugin(importlib.import_module(ref.module), ref.name, ref.distribution, ref.version)


def runtime_env() -> dict[str, Any]:
    """The driver's imagegen settings, for workers on other hosts (local ones inherit them anyway)."""
    env = {k: os.environ[k] for k in SHARED_ENV if k in os.environ}
    return {"env_vars": env} if env else {}


__all__ = ["PluginRef", "connect", "forwarded_plugins", "require_ray", "runtime_env", "setup_worker"]
