"""Request and response bodies of the images API: OpenAI's fields plus imagegen's extras.

Unknown fields are refused (a typo must not be silently ignored); `user` is OpenAI's end-user id and
here also picks the client's line in the fair queue.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from ..options import OPTIONS, Option
from ..options import parse_size as parse_text_size

_TYPES: dict[str, Any] = {"int": int, "float": float, "bool": bool, "str": str, "choice": str, "any": Any}
UPLOADS = {o.name for o in OPTIONS if "server" in o.fronts and o.kind == "image"}  # multipart file fields
# JSON fields: never a server-side path from a client ("file" options need a server-side design of their own)
FIELDS = [o for o in OPTIONS if "server" in o.fronts and o.kind in _TYPES]


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    """"WxH" -> (width, height); None or "auto" -> the model's default (None, None)."""
    if size is None or size.strip().lower() == "auto":
        return None, None
    return parse_text_size(size)


def option_field(option: Option) -> tuple[Any, Any]:
    """A declared option as a JSON field: its type, range and help (the request check enforces them again)."""
    kind = _TYPES[option.kind]
    annotation = list[kind] if option.repeatable else kind  # type: ignore[valid-type]
    bounds = {k: v for k, v in (("ge", option.minimum), ("le", option.maximum)) if v is not None}
    return annotation | None, Field(None, description=f"imagegen: {option.help}", **bounds)


class OpenAIOptions(BaseModel):
    """Fields shared by generations (JSON) and edits (multipart form)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, description="What to draw.")
    model: str | None = Field(None, description="Model id, alias or family; default: the server's first model.")
    n: int | None = Field(1, ge=1, description="Number of images; batched on the device where memory allows.")
    size: str | None = Field(None, description="'WIDTHxHEIGHT' or 'auto' (the model's default size).")
    response_format: Literal["b64_json", "url"] | None = Field(
        "b64_json", description="'url' links to /v1/files/images/<id>.png, served for a limited time.")
    stream: bool | None = Field(False, description="Server-sent events: step progress, then each image.")
    partial_images: int | None = Field(0, ge=0, le=3, description="Previews to stream during denoising (0-3).")
    output_format: Literal["png"] | None = Field(None, description="Only 'png'.")
    user: str | None = Field(None, max_length=256, description="End-user id; requests queue fairly per user.")
    quantize: str | None = Field(None, description="imagegen: quantization of the resident model, e.g. '4', '8'.")
    options: dict[str, Any] | None = Field(None, description="imagegen: the model's own options (see /v1/models).")


# OpenAI's fields plus one per option declared for the server (imagegen.options)
ImageOptions = create_model(
    "ImageOptions", __base__=OpenAIOptions, __doc__="Fields shared by generations (JSON) and edits (multipart form).",
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


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str
    aliases: list[str] = []
    tasks: list[str] = []
    default_size: str = ""
    default_steps: int | None = None
    options: list[str] = []
    quantize_modes: list[str] = []
    loaded: bool = False


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def form_schema() -> dict[str, Any]:
    """The multipart body of /v1/images/edits for the OpenAPI document (parsed by hand in the route)."""
    schema = EditRequest.model_json_schema()
    files = {"type": "array", "items": {"type": "string", "format": "binary"}}
    schema["properties"] = {"image": {"type": "string", "format": "binary"}, "image[]": files,
                            **schema["properties"]}
    return {"requestBody": {"required": True,
                            "content": {"multipart/form-data": {"schema": schema}}}}
