"""Request and response bodies of the images API: OpenAI's fields plus imagegen's extras.

Parsing is strict: unknown fields, duplicate JSON keys, NaN/Infinity, numbers sent as strings (in JSON)
and booleans spelled "yes" are refused, so a typo never silently changes an image. `user` is OpenAI's
end-user id; it divides a client's share of the fair queue among its users.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, create_model, field_validator

from ..errors import InvalidOptionError
from ..options import OPTIONS, Option, family_options
from ..options import parse_size as parse_text_size

_TYPES: dict[str, Any] = {"int": int, "float": float, "bool": bool, "str": str, "choice": str, "any": Any}
UPLOADS = {o.name for o in OPTIONS if "server" in o.fronts and o.kind == "image"}  # multipart file fields


def family_uploads() -> set[str]:
    """The installed families' image options that travel to the server: multipart file fields of an edit too."""
    from .. import registry

    return {
        o.name
        for spec in registry.all_specs()
        for o in family_options(spec.extra_options)
        if "server" in o.fronts and o.kind == "image"
    }


_FORM_INT = re.compile(r"^-?[0-9]+$", re.ASCII)
_FORM_FLOAT = re.compile(r"^-?[0-9]+(\.[0-9]*)?([eE][-+]?[0-9]+)?$", re.ASCII)
_JSON_TYPES = ("application/json",)


class BodyError(InvalidOptionError):
    """A request body refused before its fields are validated; `code` is the OpenAI-style error code."""

    def __init__(self, message: str, code: str = "invalid_json", param: str | None = None):
        super().__init__(message)
        self.code, self.param = code, param


# JSON fields: never a server-side path from a client ("file" options need a server-side design of their own)
FIELDS = [o for o in OPTIONS if "server" in o.fronts and o.kind in _TYPES]


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    """ "WxH" -> (width, height); None or "auto" -> the model's default (None, None)."""
    if size is None or size.strip().lower() == "auto":
        return None, None
    return parse_text_size(size)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json's object_pairs_hook: Python keeps the last of duplicate keys; a request means one value."""
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise BodyError(f"The JSON body gives '{key}' more than once.", "duplicate_key", key)
        obj[key] = value
    return obj


def _no_constant(name: str) -> Any:
    raise BodyError(f"We could not parse the JSON body of your request: {name} is not a JSON number.")


def parse_json_object(raw: bytes, content_type: str | None) -> dict[str, Any]:
    """The body of a JSON request as a dict. The content type must be JSON (or absent): a browser page
    cannot send that cross-site without the server's consent."""
    kind = (content_type or "").split(";")[0].strip().lower()
    if kind and kind not in _JSON_TYPES and not kind.endswith("+json"):
        raise BodyError(
            "The request body must be a JSON object, sent as 'Content-Type: application/json'.", "invalid_content_type"
        )
    if not raw.strip():
        raise BodyError("The request has no body: send a JSON object with at least a 'prompt'.", "missing_body")
    try:
        body = json.loads(raw, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, over-long integers, deep nesting
        if isinstance(e, BodyError):
            raise
        raise BodyError("We could not parse the JSON body of your request: it is not valid JSON.") from None
    if not isinstance(body, dict):
        raise BodyError("The request body must be a JSON object, sent as 'Content-Type: application/json'.")
    return body


def _form_value(annotation: Any, name: str, text: str) -> Any:
    """A multipart field (always text) as its field's type, read as strictly as JSON would be."""
    types = set(get_args(annotation)) if get_origin(annotation) in (Union, type(int | None)) else {annotation}
    if bool in types:
        if text.lower() not in ("true", "false"):
            raise BodyError(f"Invalid value for '{name}': use true or false.", "invalid_value", name)
        return text.lower() == "true"
    if int in types:
        if not _FORM_INT.match(text):
            raise BodyError(f"Invalid value for '{name}': '{text[:40]}' is not an integer.", "invalid_value", name)
        return int(text)
    if float in types:
        if not _FORM_FLOAT.match(text) or not math.isfinite(float(text)):
            raise BodyError(f"Invalid value for '{name}': '{text[:40]}' is not a finite number.", "invalid_value", name)
        return float(text)
    return text


def option_field(option: Option) -> tuple[Any, Any]:
    """A declared option as a JSON field: its type, range and help (the request check enforces them again)."""
    kind = _TYPES[option.kind]
    annotation = list[kind] if option.repeatable else kind  # type: ignore[valid-type]
    bounds = {k: v for k, v in (("ge", option.minimum), ("le", option.maximum)) if v is not None}
    return annotation | None, Field(None, description=f"imagegen: {option.help}", **bounds)


class LoraRef(BaseModel):
    """One adapter of a request: a file name from GET /v1/loras, and its strength."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, description="A file name that GET /v1/loras lists.")
    scale: float = Field(1.0, description="Strength (1.0: as trained; adapters add up).")


class OpenAIOptions(BaseModel):
    """Fields shared by generations (JSON) and edits (multipart form)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prompt: str = Field(min_length=1, description="What to draw.")
    model: str | None = Field(None, description="Model id, alias or family; default: the server's first model.")
    n: int | None = Field(1, ge=1, description="Number of images; batched on the device where memory allows.")
    size: str | None = Field(None, description="'WIDTHxHEIGHT' or 'auto' (the model's default size).")
    response_format: Literal["b64_json", "url"] | None = Field(
        "b64_json", description="'url' links to /v1/files/images/<id>.png, served for a limited time."
    )
    stream: bool | None = Field(False, description="Server-sent events: step progress, then each image.")
    partial_images: int | None = Field(
        0, ge=0, le=3, description="Previews to stream during denoising (0-3); needs stream."
    )
    output_format: Literal["png"] | None = Field(None, description="Only 'png'.")
    user: str | None = Field(None, max_length=256, description="End-user id; a client's requests take turns per user.")
    quantize: str | None = Field(None, description="imagegen: quantization of the resident model, e.g. '4', '8'.")
    options: dict[str, Any] | None = Field(None, description="imagegen: the model's own options (see /v1/models).")
    # names, not paths: files of the server's --lora-dir (the `loras` option's server form)
    loras: list[LoraRef] | None = Field(
        None,
        description="imagegen: LoRA adapters from the server's --lora-dir "
        '(GET /v1/loras), e.g. [{"name": "ink.safetensors", "scale": 0.8}].',
    )

    @field_validator("loras", mode="before")
    @classmethod
    def _json_form_field(cls, value: Any) -> Any:
        """Multipart edits send every field as text: accept the JSON list there too."""
        if isinstance(value, str):
            try:
                return json.loads(value)
            except json.JSONDecodeError:
                raise ValueError('loras must be a JSON list of {"name": ..., "scale": ...}') from None
        return value

    @field_validator("prompt")
    @classmethod
    def _has_text(cls, prompt: str) -> str:
        if not prompt.strip():
            raise ValueError("the prompt is only whitespace")
        return prompt

    @field_validator("partial_images")
    @classmethod
    def _with_stream(cls, count: int | None, info: ValidationInfo) -> int | None:
        if count and not info.data.get("stream"):  # fields validate in order: stream comes first
            raise ValueError("partial images are streamed: set stream to true, or leave partial_images out")
        return count

    @classmethod
    def from_json(cls, raw: bytes, content_type: str | None) -> Any:
        """Strict: JSON types must be the fields' own (no "2" for 2, no 1 for true)."""
        return cls.model_validate(parse_json_object(raw, content_type), strict=True)

    @classmethod
    def from_form(cls, fields: dict[str, str]) -> Any:
        """Multipart fields are text: each is read as its field's type, then validated strictly."""
        known = cls.model_fields
        values = {k: _form_value(known[k].annotation, k, v) if k in known else v for k, v in fields.items()}
        return cls.model_validate(values, strict=True)


# OpenAI's fields plus one per option declared for the server (imagegen.options)
ImageOptions = create_model(
    "ImageOptions",
    __base__=OpenAIOptions,
    __doc__="Fields shared by generations (JSON) and edits (multipart form).",
    **{o.name: option_field(o) for o in FIELDS},
)


class GenerationRequest(ImageOptions):
    """POST /v1/images/generations (application/json)."""


class EditRequest(ImageOptions):
    """POST /v1/images/edits (multipart/form-data): these fields plus one or more `image` / `image[]` files."""


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None
    seed: int = Field(description="imagegen: the seed that reproduces this image.")


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    model: str
    size: str
    output_format: Literal["png"] = "png"
    timings: dict[str, float] = Field(default_factory=dict, description="imagegen: seconds per stage.")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class OptionCard(BaseModel):
    """A model's own option (sent under `options`), as its family declares it (imagegen.Option)."""

    name: str
    kind: str
    help: str = ""
    minimum: float | None = None
    maximum: float | None = None
    choices: list[str] = []


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str
    aliases: list[str] = []
    description: str = ""
    tasks: list[str] = []
    default_size: str = ""
    size_multiple: int = 16  # imagegen: width and height must be multiples of this
    max_pixels: int = 0  # imagegen: width * height at most
    default_steps: int | None = None
    default_guidance: float | None = None
    default_strength: list[float] = []  # imagegen: for an init image: [img2img, inpainting] (models that take one)
    default_dtype: str = ""
    options: list[str] = []  # the optional generate() options it accepts (imagegen.options)
    family_options: list[OptionCard] = []  # imagegen: the model's own options, for the `options` field
    quantize_modes: list[str] = []
    loaded: bool = False
    available: bool = True  # imagegen: its weights are on this machine (or it needs none)
    default: bool = False  # imagegen: the model a request without `model` gets


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def form_schema() -> dict[str, Any]:
    """The multipart body of /v1/images/edits for the OpenAPI document (parsed by hand in the route)."""
    schema = EditRequest.model_json_schema()
    files = {"type": "array", "items": {"type": "string", "format": "binary"}}
    mask = {
        "type": "string",
        "format": "binary",
        "description": "PNG with transparency: its fully transparent pixels mark where to edit the first image.",
    }
    schema["properties"] = {
        "image": {"type": "string", "format": "binary"},
        "image[]": files,
        "mask": mask,
        **schema["properties"],
    }
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


def json_schema() -> dict[str, Any]:
    """The JSON body of /v1/images/generations for the OpenAPI document (parsed strictly in the route)."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": GenerationRequest.model_json_schema()}},
        }
    }
