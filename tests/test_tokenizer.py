"""Chat tokenizer: ids and masks identical to transformers' AutoTokenizer on the same folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import transformers

from imagegen.hub import hf_cache_dir
from imagegen.testing import SAMPLE_PROMPTS as PROMPTS
from imagegen.testing import make_tokenizer
from imagegen.text.tokenizer import ChatTokenizer


def reference(folder: Path, prompts: list[str], max_length: int, enable_thinking: bool):
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}],
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=enable_thinking,
        )
        for p in prompts
    ]
    out = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length)
    return texts, np.array(out["input_ids"]), np.array(out["attention_mask"]).astype(bool)


def check_against_transformers(folder: Path, prompts: list[str], max_length: int, enable_thinking: bool) -> None:
    texts, ids, mask = reference(folder, prompts, max_length, enable_thinking)
    ours = ChatTokenizer(folder)
    assert [ours.chat_prompt(p, enable_thinking) for p in prompts] == texts
    tokens = ours.encode_prompts(prompts, max_length, enable_thinking)
    np.testing.assert_array_equal(np.array(tokens.ids), ids)
    np.testing.assert_array_equal(np.array(tokens.mask), mask)
    assert tokens.lengths == tuple(mask.sum(axis=1))


@pytest.mark.parametrize("enable_thinking", [False, True])
def test_ids_match_transformers(tmp_path, enable_thinking):
    folder = make_tokenizer(tmp_path / "tokenizer")
    assert (folder / "chat_template.jinja").is_file()
    check_against_transformers(folder, PROMPTS, 96, enable_thinking)
    for prompt in PROMPTS:  # one at a time, as FLUX.2 Klein tokenizes
        check_against_transformers(folder, [prompt], 96, enable_thinking)


def test_template_in_tokenizer_config_and_truncation(tmp_path):
    folder = make_tokenizer(tmp_path / "tokenizer", template_file=False)
    assert not (folder / "chat_template.jinja").exists()
    assert "chat_template" in json.loads((folder / "tokenizer_config.json").read_text())
    check_against_transformers(folder, PROMPTS, 24, enable_thinking=False)
    tokens = ChatTokenizer(folder).encode_prompts(PROMPTS[3], 24)
    assert tokens.ids.shape == (1, 24) and tokens.lengths == (24,)


def test_thinking_switch_renders_like_qwen3(tmp_path):
    tokenizer = ChatTokenizer(make_tokenizer(tmp_path / "tokenizer"))
    assert tokenizer.chat_prompt("hi", enable_thinking=False) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    assert tokenizer.chat_prompt("hi", enable_thinking=True) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def _cached_qwen_tokenizers() -> list[Path]:
    """Tokenizer folders of Qwen-tokenized repos in the local Hugging Face cache (FLUX.2 Klein, Z-Image, Qwen3)."""
    found = []
    for config in sorted(hf_cache_dir().glob("models--*/snapshots/*/**/tokenizer_config.json")):
        if (config.parent / "tokenizer.json").is_file() and "Qwen2Tokenizer" in config.read_text():
            found.append(config.parent)
    return found[:2]


def test_real_qwen_tokenizer_if_cached():
    folders = _cached_qwen_tokenizers()
    if not folders:
        pytest.skip(f"no Qwen tokenizer in the Hugging Face cache ({hf_cache_dir()})")
    for folder in folders:
        for thinking in (False, True):
            check_against_transformers(folder, PROMPTS, 512, thinking)
