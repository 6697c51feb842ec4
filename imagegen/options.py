"""Every generate() option declared once: name, type, range, help, which models take it, where it travels.

From one :class:`Option` the CLI builds its flag, the server its JSON field, batch its row key, the PNG
metadata its entry and `imagegen run --from` its replay; :func:`imagegen.request.build_request` checks it.
Core options are listed in :data:`OPTIONS`; a family declares its own in ``ModelSpec.extra_options`` (they
travel under ``options`` / ``-O NAME=VALUE``) and reads every value with ``request.option(name)``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from .errors import InvalidOptionError
from .image import load_image
from .noise import NOISE_KINDS

SEED_MAX = 2**32 - 1  # numpy, torch and MLX all take it, and it is an exact number in any JSON client
FRONTS = frozenset({"cli", "server", "batch", "metadata"})  # where an option travels besides Python
KINDS = ("int", "float", "bool", "str", "choice", "image", "file", "any")
_SIZE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")
_KIND_WORDS = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "str": "a string",
    "image": "an image (a file path, PIL image or upload)",
    "file": "a path to an existing file",
}


class OptionError(InvalidOptionError):
    """A value outside its option's type or range; each front end names the option its own way."""

    def __init__(self, name: str, rule: str, value: Any, words: str = ""):
        self.name, self.rule, self.value, self.words = name, rule, value, words
        super().__init__(self.render(name, words or rule))

    def render(self, label: str, rule: str | None = None) -> str:
        """The message with the option called `label` (e.g. "--steps", "'steps'")."""
        return f"{label} must be {rule or self.rule}, got {_show(self.value)}."


class UnsupportedOptionError(InvalidOptionError):
    """A declared option the model does not take."""

    def __init__(self, model: str, name: str):
        self.model, self.name = model, name
        super().__init__(self.render(f"the option '{name}'"))

    def render(self, label: str) -> str:
        return f"Model '{self.model}' does not support {label}."


def _show(value: Any) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


@dataclass(frozen=True)
class Option:
    """One user option. `gated`: only models listing it in ``ModelSpec.options`` accept it (others refuse
    it, naming the model). `repeatable`: the value is a list (a repeated CLI flag, a JSON list). `convert`
    runs first (e.g. "PATH:SCALE" -> a pair, bool -> float); `fronts` says where it travels."""

    name: str  # the generate() keyword; also the server field, batch key and metadata key
    kind: str  # one of KINDS; "image": a path (CLI, batch), an upload (server) or a PIL image (Python)
    help: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    repeatable: bool = False
    gated: bool = True
    flag: str = ""  # CLI flag; default: --name-with-dashes
    short: str = ""
    convert: Callable[[Any], Any] | None = None
    fronts: frozenset[str] = FRONTS
    words: str = ""  # how the Python API phrases the range ("a positive integer"); default: the rule
    # metadata for kind "any": dump(value) -> JSON (files by file_ref), load(json, folders) -> value (find_saved_file)
    dump: Callable[[Any], Any] | None = field(default=None, compare=False)
    load: Callable[[Any, Sequence[Path]], Any] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Option '{self.name}': kind must be one of {KINDS}, got '{self.kind}'")

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def rule(self) -> str:
        """The range in words for messages and help: ">= 1", "within [0, 1]", "one of a, b"."""
        if self.choices:
            return "one of " + ", ".join(self.choices)
        low, high = self.minimum, self.maximum
        if low is not None and high is not None:
            return f"within [{_num(low)}, {_num(high)}]"
        if low is not None:
            return f">= {_num(low)}"
        if high is not None:
            return f"<= {_num(high)}"
        return _KIND_WORDS.get(self.kind, "valid")

    def check(self, value: Any) -> Any:
        """The normalised value (a tuple when repeatable); OptionError when the type or range is wrong."""
        if self.repeatable:
            items = [value] if isinstance(value, str | Path | Image.Image | bytes) else value
            if not isinstance(items, Sequence) or isinstance(items, str):
                raise OptionError(self.name, f"a list of {_KIND_WORDS.get(self.kind, 'values')}", value)
            return tuple(self.check_one(v) for v in items)
        return self.check_one(value)

    def check_one(self, value: Any) -> Any:
        if self.convert is not None:
            value = self.convert(value)
        if self.kind == "any":
            return value
        if self.kind == "image":
            return image_input(value)
        if self.kind == "file":
            if not isinstance(value, str | Path) or not Path(value).is_file():
                raise OptionError(self.name, _KIND_WORDS["file"], str(value))
            return Path(value)
        if self.kind == "choice":
            if value not in self.choices:
                raise OptionError(self.name, self.rule, value)
            return value
        types = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}[self.kind]
        if not isinstance(value, types) or (isinstance(value, bool) and self.kind != "bool"):
            raise OptionError(self.name, _KIND_WORDS[self.kind], value)
        if self.kind == "float":
            if not math.isfinite(value):
                raise OptionError(self.name, "a finite number", value)
            value = float(value)
        if (self.minimum is not None and value < self.minimum) or (self.maximum is not None and value > self.maximum):
            raise OptionError(self.name, self.rule, value, self.words)
        return value

    def to_json(self, value: Any) -> Any:
        """The metadata form: images and files by file name (their sha256 goes to `inputs`), the rest as is."""
        if value is None:
            return None
        if self.dump is not None:
            return self.dump(value)
        if self.kind in ("image", "file"):
            name = (lambda v: image_ref(v)["name"]) if self.kind == "image" else (lambda v: Path(v).name)
            return [name(v) for v in value] if self.repeatable else name(value)
        if self.kind == "any":  # without `dump`: whatever JSON can hold (paths as text; give `dump` for files)
            return json.loads(json.dumps(value, default=str))
        return list(value) if self.repeatable else value

    def from_json(self, value: Any, inputs: dict[str, str], folders: Sequence[Path]) -> Any:
        """The value a PNG's metadata records, for a replay: files are found by name and checked by sha256."""
        if self.load is not None:
            return self.load(value, folders)
        if self.kind not in ("image", "file"):
            return value
        found = [find_saved_file(n, inputs.get(Path(n).name), folders) for n in (value if self.repeatable else [value])]
        return found if self.repeatable else found[0]

    def inputs(self, value: Any) -> dict[str, str]:
        """{file name: sha256} of the files and images in a value (recorded beside the metadata)."""
        if value is None or self.kind not in ("image", "file"):
            return {}
        refs = [image_ref(v) if self.kind == "image" else file_ref(v) for v in (value if self.repeatable else [value])]
        return {r["name"]: r["sha256"] for r in refs}


def _lora():
    from . import lora  # imported on use: imagegen.lora finds recorded adapter files through this module

    return lora


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


# ---- images: loaded once, remembered by file name and content hash ----------------------------------
REF_KEY = "imagegen.ref"  # where an input image keeps {"name", "sha256"} in its PIL info


def image_input(source: Any, name: str | None = None, data: bytes | None = None) -> Image.Image:
    """A reference image as RGB PIL, carrying its file name and the sha256 of its bytes (a path's file, an
    upload's body; a PIL image given in Python is hashed by its pixels)."""
    if isinstance(source, Image.Image) and REF_KEY in source.info:
        return source
    image = load_image(source)
    if data is None and isinstance(source, str | Path):
        data = Path(source).read_bytes()
        name = name or Path(source).name
    digest = hashlib.sha256(data if data is not None else image.tobytes()).hexdigest()
    image.info[REF_KEY] = {"name": name or "", "sha256": digest}
    return image


def image_ref(image: Image.Image) -> dict[str, str]:
    return image.info.get(REF_KEY) or {"name": "", "sha256": hashlib.sha256(image.tobytes()).hexdigest()}


def file_ref(path: str | Path) -> dict[str, str]:
    """How metadata names a file: its base name (never the path) and the sha256 of its bytes."""
    return {"name": Path(path).name, "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest()}


def find_saved_file(name: str, sha256: str | None, folders: Sequence[Path]) -> Path:
    """The file a PNG's metadata names, looked up by name in `folders` and accepted only when its content hash
    matches: a PNG someone sent cannot make imagegen read an arbitrary path."""
    base = Path(name).name
    for folder in folders:
        path = Path(folder) / base
        if base and path.is_file() and (sha256 is None or hashlib.sha256(path.read_bytes()).hexdigest() == sha256):
            return path
    where = " or ".join(str(f) for f in folders)
    raise InvalidOptionError(
        f"The saved settings use the file '{base}'{f' (sha256 {sha256[:12]}…)' if sha256 else ''}"
        f", which is not in {where} with that content: pass it again."
    )


# ---- sizes and seeds: one parser, one range -----------------------------------------------------------
def parse_size(text: str, label: str = "size") -> tuple[int, int]:
    """ "WIDTHxHEIGHT" -> (width, height); InvalidOptionError naming the field as `label` otherwise."""
    match = _SIZE.match(text) if isinstance(text, str) and text.isascii() else None
    if match is None:
        raise InvalidOptionError(f'{label} must look like "1024x768", got {_show(text)}.')
    return int(match.group(1)), int(match.group(2))


def draw_seed() -> int:
    """A random seed for a request that names none (always reported, so the image can be redrawn)."""
    return int.from_bytes(os.urandom(4), "little") % 2**31


# ---- img2img and noise values --------------------------------------------------------------------------
def _strength(value: Any) -> Any:
    """(0, 1]: an open range the declaration's minimum / maximum cannot say (zero would run no step)."""
    if isinstance(value, int | float) and not isinstance(value, bool) and not 0 < value <= 1:
        raise OptionError("strength", "within (0, 1]", value)
    return value


def outpaint_pads(value: Any) -> tuple[int, int, int, int]:
    """ "LEFT,TOP,RIGHT,BOTTOM" pixels (or a list of four) -> four non-negative ints, not all zero."""
    parts = value.split(",") if isinstance(value, str) else value
    try:
        pads = tuple(int(p) for p in parts) if isinstance(parts, list | tuple) else ()
    except (TypeError, ValueError):
        pads = ()
    if len(pads) != 4 or min(pads) < 0 or not any(pads) or any(isinstance(p, bool | float) for p in parts):
        raise OptionError("outpaint", "LEFT,TOP,RIGHT,BOTTOM pixels (>= 0, not all 0)", value)
    return pads  # type: ignore[return-value]


def noise_slot(value: Any) -> tuple[int, int]:
    """(first, total): these images are rows first.. of a `total`-image torch-noise call (replays, server parts)."""
    if (
        not isinstance(value, list | tuple)
        or len(value) != 2
        or not all(isinstance(v, int) for v in value)
        or not 0 <= value[0] < value[1]
    ):
        raise OptionError("noise_slot", "[first, total] with 0 <= first < total", value)
    return tuple(value)  # type: ignore[return-value]


# ---- the core options -------------------------------------------------------------------------------
OPTIONS: tuple[Option, ...] = (
    Option(
        "width",
        "int",
        "Width in pixels (a multiple of the model's size step).",
        minimum=1,
        gated=False,
        short="-W",
        fronts=frozenset({"cli", "metadata"}),
    ),  # server and batch carry it in `size`
    Option(
        "height", "int", "Height in pixels.", minimum=1, gated=False, short="-H", fronts=frozenset({"cli", "metadata"})
    ),
    Option(
        "steps",
        "int",
        "Denoising steps (default: the model's).",
        minimum=1,
        gated=False,
        short="-s",
        words="a positive integer",
    ),
    Option("guidance", "float", "Guidance scale (models with CFG).", minimum=0, short="-g"),
    # the upper bound, SEED_MAX, depends on the image count (image i uses seed + i): build_request checks it
    Option(
        "seed",
        "int",
        f"Random seed of the first image, 0 to {SEED_MAX} (+i for image i; default: random, always saved).",
        minimum=0,
        gated=False,
        words="a non-negative integer",
    ),
    Option("negative_prompt", "str", "Negative prompt (models that accept one).", flag="--negative"),
    Option(
        "images",
        "image",
        "Reference image for editing models; repeatable.",
        repeatable=True,
        flag="--image",
        short="-i",
        fronts=frozenset({"cli", "batch", "metadata"}),
    ),  # the server takes uploads
    Option("tile", "bool", "Decode the image in tiles (less memory).", fronts=frozenset({"cli", "batch", "metadata"})),
    Option(
        "num_images",
        "int",
        "Number of images.",
        minimum=1,
        gated=False,
        flag="--count",
        short="-n",
        fronts=frozenset({"cli"}),
    ),  # the server's `n`; batch draws one per row; each PNG replays alone
    Option("latents", "any", "Initial noise in diffusers' `latents=` layout (Python only).", fronts=frozenset()),
    # accepted by models whose spec gives LoRA key tables (ModelSpec.lora_targets); the server takes file names
    # of its --lora-dir instead of paths (imagegen.server.loras)
    Option(
        "loras",
        "any",
        "A LoRA / LyCORIS .safetensors file, PATH[:SCALE] (scale 1.0 by default); repeatable, the adapters add up.",
        repeatable=True,
        flag="--lora",
        convert=lambda v: _lora().lora_value(v),
        dump=lambda v: _lora().lora_metadata(v),
        load=lambda v, folders: _lora().lora_replay(v, folders),
        fronts=frozenset({"cli", "batch", "metadata"}),
    ),
    Option(
        "lora_partial",
        "bool",
        "Apply what maps of a LoRA file whose other keys the model does not know (default: refuse the file).",
    ),
    # img2img / inpainting / outpainting (imagegen.img2img); the server takes the first `image` upload and
    # OpenAI's `mask` (transparent = edit) instead of these two
    Option(
        "init_image",
        "image",
        "Start from this picture (img2img; with --mask: inpainting).",
        fronts=frozenset({"cli", "batch", "metadata"}),
    ),
    Option(
        "mask",
        "image",
        "Inpainting mask for the init image: white = repaint, black = keep.",
        fronts=frozenset({"cli", "batch", "metadata"}),
    ),
    Option(
        "strength", "float", "How much of the init image to redo, in (0, 1] (default: the model's).", convert=_strength
    ),
    Option(
        "outpaint",
        "any",
        "LEFT,TOP,RIGHT,BOTTOM pixels to add around the init image and paint.",
        convert=outpaint_pads,
        dump=list,
        load=lambda value, folders: outpaint_pads(value),
    ),
    Option(
        "noise",
        "choice",
        "mlx (imagegen's own, the default) or torch (the noise diffusers draws for the seed).",
        choices=NOISE_KINDS,
        gated=False,
    ),
    Option(
        "noise_slot",
        "any",
        "torch noise: (first, total), these images' rows of a total-image call.",
        gated=False,
        convert=noise_slot,
        fronts=frozenset({"metadata"}),
        dump=list,
        load=lambda value, folders: noise_slot(value),
    ),
)
BY_NAME = {o.name: o for o in OPTIONS}


def family_options(extra: Any) -> tuple[Option, ...]:
    """A spec's `extra_options` as Options: a sequence of Option, or the older {name: parser} mapping. A
    family option is always accepted by the models that declare it (`gated` does not apply)."""
    if isinstance(extra, dict):
        return tuple(Option(name, "any", "", convert=parse) for name, parse in extra.items())
    return tuple(extra)
