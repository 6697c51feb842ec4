"""Chat tokenizer on the `tokenizers` library: chat template (sandboxed jinja2) -> padded, truncated ids.

Follows transformers' apply_chat_template (utils/chat_template_utils.py) and its tokenizers backend
(tokenization_utils_tokenizers.py: padding and truncation are set on the backend, then encode_batch),
so ids and masks are identical to `AutoTokenizer` on the same folder.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import mlx.core as mx
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from ..config import read_json
from ..errors import WeightsError, WeightsNotFoundError

SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
DEFAULT_PAD = "<|endoftext|>"  # Qwen2Tokenizer's pad token when a config names none


@dataclass(frozen=True)
class Tokens:
    """A batch of tokenized texts, each padded (or truncated) to the same length L."""

    ids: mx.array  # [B, L] int32
    mask: mx.array  # [B, L] bool, True = real token
    lengths: tuple[int, ...]  # real tokens per row


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists() and not path.is_symlink():  # a broken link or a loop is an error, not absence
        return {}
    data = read_json(path)
    if not isinstance(data, dict):
        raise WeightsError(f"{path} must hold a JSON object, not a {type(data).__name__}.")
    return data


def _token_text(value: Any) -> str | None:
    """A special token as configs store it: a string or an AddedToken dict with `content`."""
    return value.get("content") if isinstance(value, dict) else value


def _chat_template(folder: Path, config: dict[str, Any]) -> str | None:
    """chat_template.jinja (transformers 5) wins over tokenizer_config.json's chat_template, as in transformers."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        template = {t["name"]: t["template"] for t in template}.get("default")
    return template


def compile_chat_template(source: str) -> jinja2.Template:
    """The sandboxed environment transformers renders chat templates in (same options, filters, globals)."""

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
    ) -> str:
        # jinja's own tojson escapes HTML characters; transformers' does not
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class ChatTokenizer:
    """A tokenizer folder (tokenizer.json, tokenizer_config.json, chat template) ready for prompts."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        file = folder / "tokenizer.json"
        if not file.is_file():
            raise WeightsNotFoundError(f"Missing {file}")
        self.folder = folder
        try:
            self.backend = Tokenizer.from_file(str(file))
        except Exception as e:  # the tokenizers library raises its own Exception for malformed files
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise WeightsError(f"Cannot read {file}: {reason}") from None
        config = _read_json(folder / "tokenizer_config.json")
        fallback = _read_json(folder / "special_tokens_map.json")
        self.special_tokens = {
            name: text
            for name in SPECIAL_NAMES
            if (text := _token_text(config.get(name, fallback.get(name)))) is not None
        }
        self.pad_token = self.special_tokens.get("pad_token", DEFAULT_PAD)
        self.pad_id = self.backend.token_to_id(self.pad_token)
        if self.pad_id is None:
            raise WeightsError(f"{folder}: pad token {self.pad_token!r} is not in the vocabulary")
        self.padding_side = config.get("padding_side", "right")
        self.truncation_side = config.get("truncation_side", "right")
        source = _chat_template(folder, config)
        self.template = compile_chat_template(source) if source else None
        self._lock = threading.Lock()  # padding/truncation are settings of the shared backend

    def apply_chat_template(
        self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """Render a conversation; special tokens and kwargs (e.g. enable_thinking) are template variables."""
        if self.template is None:
            raise WeightsError(f"{self.folder} has no chat template")
        return self.template.render(
            messages=list(messages),
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **{**self.special_tokens, **kwargs},
        )

    def chat_prompt(self, prompt: str, enable_thinking: bool = False) -> str:
        """One user message with the assistant's turn opened, as the Qwen-conditioned pipelines build it."""
        return self.apply_chat_template([{"role": "user", "content": prompt}], enable_thinking=enable_thinking)

    def __call__(self, texts: str | Sequence[str], max_length: int) -> Tokens:
        """Tokenize texts truncated and padded to max_length: transformers' `tokenizer(texts, padding="max_length",
        truncation=True, max_length=max_length)`, special tokens of the post-processor included."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        with self._lock:
            self.backend.enable_truncation(
                max_length, stride=0, strategy="longest_first", direction=self.truncation_side
            )
            self.backend.enable_padding(
                length=max_length,
                direction=self.padding_side,
                pad_id=self.pad_id,
                pad_token=self.pad_token,
                pad_type_id=0,
            )
            encodings = self.backend.encode_batch(texts, add_special_tokens=True)
        ids = np.array([e.ids for e in encodings], dtype=np.int32)
        mask = np.array([e.attention_mask for e in encodings], dtype=bool)
        return Tokens(ids=mx.array(ids), mask=mx.array(mask), lengths=tuple(int(n) for n in mask.sum(axis=1)))

    def encode_prompts(
        self, prompts: str | Sequence[str], max_length: int = 512, enable_thinking: bool = False
    ) -> Tokens:
        """Chat-template each prompt, then tokenize: diffusers' Qwen3 prompt encoding (FLUX.2 Klein: thinking
        off; Z-Image: thinking on)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return self([self.chat_prompt(p, enable_thinking) for p in prompts], max_length)
