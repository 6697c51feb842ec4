"""Model registry: specs registered by plugins, resolved by id, alias or family name."""

from __future__ import annotations

import difflib
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import block_loop, hub, plugins
from .errors import InvalidOptionError, UnknownModelError
from .options import family_options
from .quantize import normalize_mode
from .request import build_request

if TYPE_CHECKING:
    from PIL import Image

    from .options import Option
    from .pipeline import Pipeline
    from .request import Request

TEXT_TO_IMAGE, IMAGE_EDIT = "text-to-image", "image-edit"
LORA_OPTIONS = ("loras", "lora_partial")  # accepted by every model that gives lora_targets
COMPONENTS = ("vae", "controlnet")  # parts a pipeline may load from elsewhere: spec.pipeline(NAME=DIR), --NAME DIR


@dataclass(frozen=True)
class ModelSpec:
    """What a model is and how to load it. Plugins build these and pass them to ``register``."""

    id: str
    family: str
    load: Callable[..., Pipeline]  # load(spec, weights: Path | None, dtype=, quantize=, **kwargs)
    aliases: tuple[str, ...] = ()
    description: str = ""
    hf_repo: str | None = None  # official Hugging Face repo id of the weights
    bundled_weights: Path | None = None  # weights shipped inside the plugin package
    needs_weights: bool = True  # False for procedural models
    default_steps: int = 4
    default_guidance: float | None = None
    default_size: tuple[int, int] = (1024, 1024)  # (width, height)
    max_pixels: int = 2048 * 2048
    size_multiple: int = 16
    tasks: tuple[str, ...] = (TEXT_TO_IMAGE,)
    options: frozenset[str] = frozenset()  # the gated core options (imagegen.options.OPTIONS) this model accepts
    # components the pipeline can load from another folder or repo: spec.pipeline(vae=DIR) for "vae"
    components: frozenset[str] = frozenset()
    # the family's own options (read with request.option(name)); a {name: parser} mapping is also accepted
    extra_options: Sequence[Option] | dict[str, Callable[[Any], Any]] = field(default=(), hash=False, compare=False)
    # (width, height) to draw when the caller gives reference images but no size; None: default_size
    reference_size: Callable[[Image.Image], tuple[int, int]] | None = field(default=None, hash=False, compare=False)
    # img2img (imagegen.img2img): the default strength without and with a mask (the family's diffusers pipelines'),
    # and (width, height) to draw from an init image when no size is given (None: its size, rounded down)
    default_strength: tuple[float, float] = (1.0, 1.0)
    init_size: Callable[[Image.Image], tuple[int, int]] | None = field(default=None, hash=False, compare=False)
    quantize_modes: tuple[str, ...] = ()  # accepted --quantize values; empty = no quantization
    default_dtype: str = "bfloat16"
    family_default: bool = False  # the family name resolves to this variant
    run_default: bool = False  # `imagegen run` uses this model when neither --model nor $IMAGEGEN_MODEL names one
    # estimate_memory(spec, weights: Path | None, dtype, quantize, width, height, batch) -> bytes at peak
    estimate_memory: Callable[..., int] | None = None
    # the pipeline runs its transformer blocks through imagegen.block_loop: plugins' block-loop options apply
    block_loop: bool = False
    # LoRA key tables of the transformer: lora_targets(transformer) -> {naming style: {source layer: parts}}
    # (imagegen.lora.targets); None: the model takes no adapters
    lora_targets: Callable[[Any], dict[str, Any]] | None = field(default=None, hash=False, compare=False)
    plugin: str = ""  # filled in by the registry
    extra: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def accepts(self, option: str) -> bool:
        return option in self.options or (option in LORA_OPTIONS and self.lora_targets is not None)

    def request(self, prompt: str | Sequence[str], **options: Any) -> Request:
        """Check generate() options against this model and fill in its defaults, without loading weights."""
        return build_request(self, prompt, **options)

    def check_components(self, components: dict[str, Any]) -> None:
        """Refuse a part loaded from elsewhere (COMPONENTS: vae=, controlnet=) that this model does not take."""
        other = next(
            (name for name, value in components.items() if value is not None and name not in self.components), None
        )
        if other is not None:
            raise InvalidOptionError(f"Model '{self.id}' does not support --{other}.")

    def check_quantize(self, quantize: str | None) -> str | None:
        """The normalized quantization mode, or InvalidOptionError when this model does not support it."""
        if quantize is None:
            return None
        quantize = normalize_mode(quantize)
        if quantize.partition("@")[0] not in self.quantize_modes:  # a model taking "4" takes "4@32" too
            supported = ", ".join(self.quantize_modes) or "none"
            raise InvalidOptionError(
                f"Model '{self.id}' does not support --quantize {quantize} (supported: {supported})."
            )
        return quantize

    def pipeline(
        self,
        weights: str | Path | None = None,
        dtype: str | None = None,
        quantize: str | None = None,
        **kwargs: Any,
    ) -> Pipeline:
        """Load this model: resolve weights (folder, HF cache, bundled) and build a resident pipeline."""
        quantize = self.check_quantize(quantize)
        self.check_components({k: v for k, v in kwargs.items() if k in COMPONENTS})
        path = hub.resolve_weights(self, weights)
        return self.load(self, path, dtype=dtype or self.default_dtype, quantize=quantize, **kwargs)


_specs: dict[str, ModelSpec] | None = None
_aliases: dict[str, str] = {}
_families: dict[str, str] = {}


def _build() -> dict[str, ModelSpec]:
    pm = plugins.get_plugin_manager()
    specs: dict[str, ModelSpec] = {}
    aliases: dict[str, str] = {}
    for impl in pm.hook.register_models.get_hookimpls():
        name = impl.plugin_name
        mine: list[ModelSpec] = []
        try:
            impl.function(register=mine.append)
        except Exception as e:
            warnings.warn(f"imagegen: plugin '{name}' failed to register models ({e})", stacklevel=3)
            continue
        info = plugins.plugin_info(name)
        for spec in mine:
            taken = [n for n in (spec.id, *spec.aliases) if n in specs or n in aliases]
            if taken:
                warnings.warn(
                    f"imagegen: plugin '{name}' registers '{taken[0]}', which is already taken; skipped",
                    stacklevel=3,
                )
                continue
            spec = replace(spec, plugin=name)
            specs[spec.id] = spec
            aliases.update({a: spec.id for a in spec.aliases})
            if info is not None and spec.id not in info.models:
                info.models.append(spec.id)
    offered = _block_loop_options() if any(s.block_loop for s in specs.values()) else ()
    for key, spec in specs.items():
        if spec.block_loop:  # plugins' block-loop options join the family's own (which win a name clash)
            own = family_options(spec.extra_options)
            names = {o.name for o in own}
            specs[key] = replace(spec, extra_options=(*own, *(o for o in offered if o.name not in names)))
    families: dict[str, str] = {}
    for spec in specs.values():
        if spec.family_default or spec.family not in families:
            families.setdefault(spec.family, spec.id)
            if spec.family_default:
                families[spec.family] = spec.id
    _aliases.clear(), _aliases.update(aliases)
    _families.clear(), _families.update({f: i for f, i in families.items() if f not in specs})
    return specs


def _block_loop_options() -> tuple[Option, ...]:
    return tuple(offer.option for offer in block_loop.options().values())


def _registry() -> dict[str, ModelSpec]:
    global _specs
    if _specs is None:
        _specs = _build()
    return _specs


def invalidate() -> None:
    """Rebuild the registry on next use (after plugins are added or removed)."""
    global _specs
    _specs = None


def all_specs() -> list[ModelSpec]:
    return sorted(_registry().values(), key=lambda s: (s.family, s.id))


def names() -> list[str]:
    """Every name that resolves: ids, aliases and family names."""
    specs = _registry()
    return sorted({*specs, *_aliases, *_families})


def get(name: str) -> ModelSpec:
    """Resolve a model id, an alias or a family name (its default variant)."""
    specs = _registry()
    key = name.strip().lower()
    key = _aliases.get(key) or _families.get(key) or key
    if key in specs:
        return specs[key]
    raise UnknownModelError(name, suggest(name))


def suggest(name: str, n: int = 3) -> list[str]:
    candidates = names()
    close = difflib.get_close_matches(name.lower(), candidates, n=n, cutoff=0.5)
    prefix = [c for c in candidates if name and (c.startswith(name.lower()) or name.lower() in c)]
    return list(dict.fromkeys([*close, *prefix]))[:n]


def default_model() -> str | None:
    """The model `imagegen run` uses without --model: $IMAGEGEN_MODEL, else the one a plugin marks
    `run_default` (the bundled demo model), else the first installed."""
    env = os.environ.get("IMAGEGEN_MODEL")
    if env:
        return env
    specs = _registry()
    marked = sorted(i for i, s in specs.items() if s.run_default)
    return next(iter(marked or sorted(specs)), None)
