"""imagegen: plugin-based, multi-model image generation on MLX.

The names here are the public API that users and plugins (in-tree and third-party) import.
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

# isort: off
from . import kernel_cache  # noqa: F401  (first: it sets MLX's kernel cache folder before MLX starts CUDA)

# isort: on
from . import block_loop, registry
from .block_loop import BlockLoopOption
from .config import HFConfig
from .errors import (
    DISTRIBUTION,
    ImagegenError,
    InvalidImageError,
    InvalidOptionError,
    LoraError,
    UnknownModelError,
    WeightsError,
    WeightsNotFoundError,
)
from .hookspecs import hookimpl
from .options import Option
from .pipeline import GenerationResult, Pipeline, Request, Run, Step, seeded_noise
from .registry import IMAGE_EDIT, TEXT_TO_IMAGE, ModelSpec

try:
    __version__ = _version(DISTRIBUTION)
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = [
    "BlockLoopOption",
    "GenerationResult",
    "HFConfig",
    "IMAGE_EDIT",
    "ImagegenError",
    "InvalidImageError",
    "InvalidOptionError",
    "LoraError",
    "ModelSpec",
    "Option",
    "Pipeline",
    "Request",
    "Run",
    "Step",
    "TEXT_TO_IMAGE",
    "UnknownModelError",
    "WeightsError",
    "WeightsNotFoundError",
    "block_loop",
    "hookimpl",
    "registry",
    "seeded_noise",
    "__version__",
]
