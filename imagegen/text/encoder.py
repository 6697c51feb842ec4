"""The shared Qwen3 text encoder: one loaded copy per distinct checkpoint, prompt features cached (LRU).

Identity is content-based, so two pipelines whose folders hold the same weights share one encoder (and its
memory), even from different repos, file names or shardings. Loaded encoders are held weakly: when the
last pipeline using one is gone, it is freed.
"""

from __future__ import annotations

import hashlib
import json
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from ..errors import WeightsError, WeightsNotFoundError
from ..lora.adapters import current_text_patch, patched
from ..quantize import QUANT_FILE, normalize_mode
from ..weights import safetensors_files, to_dtype, using_random_weights
from .qwen3 import Qwen3Config, Qwen3Model, load_qwen3
from .tokenizer import ChatTokenizer

CACHE_ENTRIES = 64  # prompt features kept per encoder
CACHE_BYTES = 1 << 30  # and at most this much memory (a FLUX.2 Klein 4B entry is ~7.5 MiB in bfloat16)
SAMPLE_BYTES = 256  # read at the start and the middle of every tensor for the fingerprint


@dataclass(frozen=True)
class PromptFeatures:
    """One prompt's encoder output."""

    hidden: mx.array  # [n_layers, L, D]: the asked hidden states, L = max_length (padding included)
    mask: mx.array  # [L] bool, True = real token (right padding: the first `length` positions)
    length: int  # real tokens


def weights_fingerprint(folder: str | Path) -> str:
    """Content identity of a Qwen3 folder, blind to file names, sharding and config trivia (versions,
    architectures): the parsed config, the quantization record, and per tensor its name, dtype, shape and
    two sampled chunks. Files are never read whole: two small reads per tensor (~800 for Qwen3-8B)."""
    folder = Path(folder)
    if using_random_weights():  # nothing to read: the folder stands for its random content
        return hashlib.sha256(f"random:{folder.resolve()}".encode()).hexdigest()
    config = Qwen3Config.from_file(folder / "config.json").model_dump(exclude={"unknown_keys"})
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    if (folder / QUANT_FILE).is_file():
        digest.update((folder / QUANT_FILE).read_bytes())
    tensors = {}  # name -> (file, data start, header entry)
    for path in safetensors_files(folder):
        with path.open("rb") as f:
            try:
                size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(size))
            except (ValueError, UnicodeDecodeError) as e:
                raise WeightsError(f"{path} is not a safetensors file ({e})") from None
        # names as Qwen3Model.sanitize makes them: Qwen3ForCausalLM and Qwen3Model folders may share
        tensors.update(
            {
                k.removeprefix("model."): (path, 8 + size, v)
                for k, v in header.items()
                if k != "__metadata__" and not k.startswith("lm_head.")
            }
        )
    files = {}
    try:
        for name in sorted(tensors):
            path, base, entry = tensors[name]
            f = files.get(path) or files.setdefault(path, path.open("rb"))
            start, end = entry["data_offsets"]
            digest.update(f"{name}|{entry['dtype']}|{entry['shape']}|".encode())
            for at in (start, (start + end) // 2):
                f.seek(base + at)
                digest.update(f.read(min(SAMPLE_BYTES, end - at)))
    finally:
        for f in files.values():
            f.close()
    return digest.hexdigest()


def files_fingerprint(folder: str | Path) -> str:
    """Content identity of a small folder (a tokenizer): every regular file, whole."""
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsNotFoundError(f"Missing component folder {folder}")
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


class TextEncoder:
    """A Qwen3 stack and its tokenizer. `encode` returns the hidden states the pipelines condition on."""

    def __init__(self, model: Qwen3Model, tokenizer: ChatTokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self._cache: OrderedDict[tuple, PromptFeatures] = OrderedDict()
        self._cache_bytes = 0
        self._lock = threading.Lock()

    def encode(
        self, prompts: str | Sequence[str], layers: Sequence[int], max_length: int = 512, enable_thinking: bool = False
    ) -> list[PromptFeatures]:
        """Features of each prompt (chat template, tokens padded to max_length, hidden states of `layers`).

        `layers` index transformers' `output_hidden_states` (0 = embeddings, -1 = last with the final norm,
        -2 = output of the second-to-last layer). Cached prompts are not re-encoded; the others are encoded
        in one batched forward. Text-encoder adapters of the calling request (imagegen.lora.text_adapters) are
        applied to this forward only."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        layers = tuple(self.model.resolve_layers(layers))
        patch = current_text_patch()
        key = (layers, max_length, enable_thinking, patch.identity if patch else ())
        with self._lock:
            found = {p: self._get((*key, p)) for p in dict.fromkeys(prompts)}
            missing = [p for p, f in found.items() if f is None]
            if missing:
                tokens = self.tokenizer.encode_prompts(missing, max_length, enable_thinking)
                with patched(self.model, patch, self.model.embed_tokens.weight.dtype):
                    hidden = mx.stack(self.model.forward_with_layer_outputs(tokens.ids, tokens.mask, layers), axis=1)
                    mx.eval(hidden)
                for i, p in enumerate(missing):
                    found[p] = PromptFeatures(hidden=hidden[i], mask=tokens.mask[i], length=tokens.lengths[i])
                    self._put((*key, p), found[p])
        return [found[p] for p in prompts]

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()
            self._cache_bytes = 0

    def _get(self, key: tuple) -> PromptFeatures | None:
        features = self._cache.get(key)
        if features is not None:
            self._cache.move_to_end(key)
        return features

    def _put(self, key: tuple, features: PromptFeatures) -> None:
        self._cache[key] = features
        self._cache_bytes += features.hidden.nbytes
        while len(self._cache) > CACHE_ENTRIES or (self._cache_bytes > CACHE_BYTES and len(self._cache) > 1):
            _, old = self._cache.popitem(last=False)
            self._cache_bytes -= old.hidden.nbytes


_models: weakref.WeakValueDictionary[tuple, Qwen3Model] = weakref.WeakValueDictionary()
_encoders: weakref.WeakValueDictionary[tuple, TextEncoder] = weakref.WeakValueDictionary()
_load_lock = threading.Lock()


def load_text_encoder(
    text_encoder_dir: str | Path,
    tokenizer_dir: str | Path,
    dtype: str | mx.Dtype = "bfloat16",
    quantize: str | None = None,
    layers: Sequence[int] | None = None,
) -> TextEncoder:
    """The text encoder of these folders, shared with every live caller that loaded the same content.

    Weights are shared across tokenizers (two pipelines may template prompts differently yet hold one
    copy of the Qwen3 stack); an encoder is freed once no caller holds it. `layers` (the hidden states
    this caller needs) lets the first loader leave later layers on disk until some caller runs them."""
    quantize = normalize_mode(quantize) if quantize is not None else None
    model_key = (weights_fingerprint(text_encoder_dir), str(to_dtype(dtype)), quantize)
    encoder_key = (*model_key, files_fingerprint(tokenizer_dir))
    with _load_lock:
        encoder = _encoders.get(encoder_key)
        if encoder is None:
            model = _models.get(model_key)
            if model is None:
                model = load_qwen3(text_encoder_dir, dtype=dtype, quantize=quantize, layers=layers)
                _models[model_key] = model
            encoder = TextEncoder(model, ChatTokenizer(tokenizer_dir))
            _encoders[encoder_key] = encoder
        return encoder
