"""The shared text encoder: diffusers' prompt embeddings (FLUX.2 Klein, Z-Image), sharing and caching."""

from __future__ import annotations

import gc
import shutil
import weakref
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers
from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline
from diffusers.pipelines.z_image.pipeline_z_image import ZImagePipeline

import imagegen.text.encoder as encoder_module
from imagegen.testing import SAMPLE_PROMPTS as PROMPTS
from imagegen.testing import make_qwen3, make_tokenizer
from imagegen.text import load_text_encoder

VOCAB = 416  # covers the test tokenizer's 400 BPE tokens and its added tokens
MAX_LENGTH = 48  # the long prompt is truncated


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoder")
    reference = make_qwen3(root / "text_encoder", vocab_size=VOCAB)
    make_tokenizer(root / "tokenizer")
    tokenizer = transformers.AutoTokenizer.from_pretrained(root / "tokenizer")
    return SimpleNamespace(
        root=root, te=root / "text_encoder", tok=root / "tokenizer", reference=reference, tokenizer=tokenizer
    )


def relative_error(got, want) -> float:
    got, want = np.asarray(got, dtype=np.float32), np.asarray(want, dtype=np.float32)
    return float(np.abs(got - want).max() / np.abs(want).max())


def test_flux2_klein_embeddings_match_diffusers(folders):
    """All max_length positions, pads included, of hidden states 1, 2 and 3 (the last, normed), stacked."""
    layers = (1, 2, 3)
    with torch.no_grad():
        want = Flux2KleinPipeline._get_qwen3_prompt_embeds(
            folders.reference,
            folders.tokenizer,
            PROMPTS,
            dtype=torch.float32,
            device="cpu",
            max_sequence_length=MAX_LENGTH,
            hidden_states_layers=layers,
        ).numpy()
    encoder = load_text_encoder(folders.te, folders.tok, dtype="float32")
    features = encoder.encode(PROMPTS, layers=layers, max_length=MAX_LENGTH, enable_thinking=False)
    got = np.stack([np.array(f.hidden).transpose(1, 0, 2).reshape(MAX_LENGTH, -1) for f in features])
    assert got.shape == want.shape
    assert relative_error(got, want) < 1e-5


def test_zimage_embeddings_match_diffusers(folders):
    """Hidden state -2 with thinking on, valid tokens only."""
    pipe = SimpleNamespace(tokenizer=folders.tokenizer, text_encoder=folders.reference)
    with torch.no_grad():
        want = ZImagePipeline._encode_prompt(pipe, list(PROMPTS), device="cpu", max_sequence_length=MAX_LENGTH)
    encoder = load_text_encoder(folders.te, folders.tok, dtype="float32")
    features = encoder.encode(PROMPTS, layers=[-2], max_length=MAX_LENGTH, enable_thinking=True)
    for f, w in zip(features, want, strict=True):
        mask = np.array(f.mask)
        assert mask[: f.length].all() and not mask[f.length :].any()
        assert relative_error(np.array(f.hidden[0, : f.length]), w.numpy()) < 1e-5


def test_same_content_shares_one_encoder(folders, tmp_path):
    first = load_text_encoder(folders.te, folders.tok, dtype="float32")
    shutil.copytree(folders.root, tmp_path / "copy")
    assert load_text_encoder(tmp_path / "copy/text_encoder", tmp_path / "copy/tokenizer", "float32") is first
    folders.reference.save_pretrained(tmp_path / "resharded", max_shard_size="40KB")  # same tensors, other files
    assert len(list((tmp_path / "resharded").glob("*.safetensors"))) > 1
    assert load_text_encoder(tmp_path / "resharded", folders.tok, dtype="float32") is first

    make_qwen3(tmp_path / "other", seed=1, vocab_size=VOCAB)
    assert load_text_encoder(tmp_path / "other", folders.tok, dtype="float32") is not first
    assert load_text_encoder(folders.te, folders.tok, dtype="bfloat16") is not first

    shutil.copytree(folders.tok, tmp_path / "tok2")
    (tmp_path / "tok2/chat_template.jinja").write_text("{{ messages[0].content }}")
    other_template = load_text_encoder(folders.te, tmp_path / "tok2", dtype="float32")
    assert other_template is not first and other_template.model is first.model  # one copy of the weights

    alive = weakref.ref(first), weakref.ref(first.model)
    del first, other_template
    gc.collect()
    assert alive[0]() is None and alive[1]() is None  # nothing keeps a released encoder in memory


def test_repeated_prompts_do_not_run_the_model(folders, monkeypatch):
    encoder = load_text_encoder(folders.te, folders.tok, dtype="float32")
    encoder.clear_cache()
    batches = []
    forward = encoder.model.forward_with_layer_outputs

    def spy(ids, mask, layers):
        batches.append(ids.shape[0])
        return forward(ids, mask, layers)

    monkeypatch.setattr(encoder.model, "forward_with_layer_outputs", spy)
    a, b = encoder.encode(["a fox", "a cat"], layers=[1, -1], max_length=16)
    assert batches == [2]  # one batched forward
    again = encoder.encode(["a cat", "a fox"], layers=[1, 3], max_length=16)  # -1 is 3
    assert batches == [2] and again[0] is b and again[1] is a
    c, b2, c2 = encoder.encode(["a dog", "a cat", "a dog"], layers=[1, 3], max_length=16)
    assert batches == [2, 1] and b2 is b and c2 is c  # only the new prompt, once
    assert relative_error(c.hidden, encoder.encode(["a dog"], [1, 3], 16, enable_thinking=True)[0].hidden) > 0
    assert batches == [2, 1, 1]  # the thinking switch is part of the key

    monkeypatch.setattr(encoder_module, "CACHE_ENTRIES", 2)
    encoder.encode(["x", "y", "z"], layers=[1], max_length=16)
    encoder.encode(["z"], layers=[1], max_length=16)
    encoder.encode(["x"], layers=[1], max_length=16)  # evicted (least recently used)
    assert batches == [2, 1, 1, 3, 1] and len(encoder._cache) == 2


def test_one_encoder_serves_both_families_as_each_alone(folders, monkeypatch):
    """FLUX.2 Klein (layers 1, 2, 3, no thinking, every position) and Z-Image (layer -2, thinking) folders holding
    the same Qwen3 share one encoder; each family's features from it equal those of an encoder of its own."""
    klein = {"layers": (1, 2, 3), "max_length": MAX_LENGTH, "enable_thinking": False}
    zimage = {"layers": (-2,), "max_length": MAX_LENGTH, "enable_thinking": True}
    shared = load_text_encoder(folders.te, folders.tok, dtype="float32")
    shared.clear_cache()
    both = [shared.encode(PROMPTS, **klein), shared.encode(PROMPTS, **zimage)]
    monkeypatch.setattr(encoder_module, "_models", weakref.WeakValueDictionary())
    monkeypatch.setattr(encoder_module, "_encoders", weakref.WeakValueDictionary())
    alone = load_text_encoder(folders.te, folders.tok, dtype="float32")
    assert alone.model is not shared.model
    for features, options in zip(both, (klein, zimage), strict=True):
        for got, want in zip(features, alone.encode(PROMPTS, **options), strict=True):
            assert got.length == want.length and np.array_equal(np.array(got.hidden), np.array(want.hidden))
    assert both[0][0].hidden.shape[0] == 3 and both[1][0].hidden.shape[0] == 1
    assert any(k.length != z.length for k, z in zip(*both))  # the thinking switch: each family its own tokens
