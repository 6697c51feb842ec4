"""Canny edges of a control image with OpenCV's cv2.Canny, as diffusers' ControlNet docs and ComfyUI prepare canny
control images (white edges on black, three channels). OpenCV is the optional extra `imagegen-zimage[canny]`."""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from imagegen.errors import InvalidOptionError

DEFAULT_THRESHOLDS = (100, 200)  # the low / high hysteresis thresholds of diffusers' ControlNet examples
INSTALL = 'pip install "imagegen-zimage[canny]" (or: pip install opencv-python-headless)'


def _cv2() -> Any:
    try:
        import cv2
    except ImportError:
        raise InvalidOptionError(f"canny needs OpenCV: {INSTALL}.") from None
    return cv2


def canny_thresholds(value: Any) -> tuple[int, int]:
    """The option's value: true / "default" (100, 200), or "LOW,HIGH" / [LOW, HIGH] with 0 <= LOW <= HIGH <= 1000
    (Sobel gradients of 8-bit images stay below that); checks OpenCV is installed, before anything loads."""
    if value is True or (isinstance(value, str) and value.strip().lower() in ("default", "true", "on")):
        pair: Any = DEFAULT_THRESHOLDS
    else:
        pair = value.split(",") if isinstance(value, str) else value
    try:
        low, high = (float(v) for v in pair) if isinstance(pair, list | tuple) and len(pair) == 2 else (None, None)
    except (TypeError, ValueError):
        low = high = None
    if low is None or high is None or isinstance(pair[0], bool) or not 0 <= low <= high <= 1000:
        raise InvalidOptionError(
            f"canny must be LOW,HIGH thresholds with 0 <= LOW <= HIGH <= 1000 (or 'default' for "
            f"{DEFAULT_THRESHOLDS[0]},{DEFAULT_THRESHOLDS[1]}), got {value!r}."
        )
    _cv2()
    return int(low) if low.is_integer() else low, int(high) if high.is_integer() else high


def canny_edges(image: Image.Image, low: float, high: float) -> Image.Image:
    """White-on-black edges of an RGB image at its own size, as an RGB image (cv2.Canny of the RGB array)."""
    edges = _cv2().Canny(np.asarray(image.convert("RGB")), low, high)
    return Image.fromarray(np.repeat(edges[:, :, None], 3, axis=2))
