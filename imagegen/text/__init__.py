"""The shared Qwen3 text encoder: model, chat tokenizer, and the cached, shared encoder pipelines call."""

from .encoder import PromptFeatures, TextEncoder, files_fingerprint, load_text_encoder, weights_fingerprint
from .qwen3 import Qwen3Config, Qwen3Model, load_qwen3, quant_predicate
from .tokenizer import ChatTokenizer, Tokens, compile_chat_template

__all__ = [
    "ChatTokenizer",
    "PromptFeatures",
    "Qwen3Config",
    "Qwen3Model",
    "TextEncoder",
    "Tokens",
    "compile_chat_template",
    "files_fingerprint",
    "load_qwen3",
    "load_text_encoder",
    "quant_predicate",
    "weights_fingerprint",
]
