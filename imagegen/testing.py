"""Tiny reference checkpoints for tests, built with the reference libraries (torch, transformers) and saved
in the exact Hugging Face layouts. Needs the `test` extra; plugin authors can build their fixtures on it."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
from tokenizers import models as tokenizer_models

# The chat template Qwen3 checkpoints ship (Qwen/Qwen3-4B tokenizer_config.json).
QWEN3_TEMPLATE = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0].role == 'system' %}\n"
    "        {{- messages[0].content + '\\n\\n' }}\n    {%- endif %}\n"
    '    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided '
    'with function signatures within <tools></tools> XML tags:\\n<tools>" }}\n    {%- for tool in tools %}\n'
    '        {{- "\\n" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n'
    '    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments '
    'within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": '
    '<args-json-object>}\\n</tool_call><|im_end|>\\n" }}\n{%- else %}\n'
    "    {%- if messages[0].role == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n"
    "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}\n"
    "{%- for message in messages[::-1] %}\n    {%- set index = (messages|length - 1) - loop.index0 %}\n"
    "    {%- if ns.multi_step_tool and message.role == \"user\" and not(message.content.startswith('<tool_response>') "
    "and message.content.endswith('</tool_response>')) %}\n        {%- set ns.multi_step_tool = false %}\n"
    "        {%- set ns.last_query_index = index %}\n    {%- endif %}\n{%- endfor %}\n"
    "{%- for message in messages %}\n"
    '    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    '    {%- elif message.role == "assistant" %}\n        {%- set content = message.content %}\n'
    "        {%- set reasoning_content = '' %}\n"
    "        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}\n"
    "            {%- set reasoning_content = message.reasoning_content %}\n        {%- else %}\n"
    "            {%- if '</think>' in message.content %}\n"
    "                {%- set content = message.content.split('</think>')[-1].lstrip('\\n') %}\n"
    "                {%- set reasoning_content = message.content.split('</think>')[0].rstrip('\\n')"
    ".split('<think>')[-1].lstrip('\\n') %}\n            {%- endif %}\n        {%- endif %}\n"
    "        {%- if loop.index0 > ns.last_query_index %}\n"
    "            {%- if loop.last or (not loop.last and reasoning_content) %}\n"
    "                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + "
    "'\\n</think>\\n\\n' + content.lstrip('\\n') }}\n            {%- else %}\n"
    "                {{- '<|im_start|>' + message.role + '\\n' + content }}\n            {%- endif %}\n"
    "        {%- else %}\n            {{- '<|im_start|>' + message.role + '\\n' + content }}\n        {%- endif %}\n"
    "        {%- if message.tool_calls %}\n            {%- for tool_call in message.tool_calls %}\n"
    "                {%- if (loop.first and content) or (not loop.first) %}\n                    {{- '\\n' }}\n"
    "                {%- endif %}\n                {%- if tool_call.function %}\n"
    "                    {%- set tool_call = tool_call.function %}\n                {%- endif %}\n"
    '                {{- \'<tool_call>\\n{"name": "\' }}\n                {{- tool_call.name }}\n'
    '                {{- \'", "arguments": \' }}\n                {%- if tool_call.arguments is string %}\n'
    "                    {{- tool_call.arguments }}\n                {%- else %}\n"
    "                    {{- tool_call.arguments | tojson }}\n                {%- endif %}\n"
    "                {{- '}\\n</tool_call>' }}\n            {%- endfor %}\n        {%- endif %}\n"
    "        {{- '<|im_end|>\\n' }}\n    {%- elif message.role == \"tool\" %}\n"
    '        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}\n'
    "            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n        {{- '\\n</tool_response>' }}\n"
    '        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}\n'
    "            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n"
    "    {%- if enable_thinking is defined and enable_thinking is false %}\n"
    "        {{- '<think>\\n\\n</think>\\n\\n' }}\n    {%- endif %}\n{%- endif %}"
)
# Qwen2Tokenizer's pre-tokenizer split (transformers models/qwen2/tokenization_qwen2.py)
QWEN_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)
CORPUS = [
    "A fox in the snow, photographed at dawn with a telephoto lens.",
    "Une maison bleue près de la mer; café crème, naïve façade.",
    "東京の夜景と桜の花。猫がいる。 Пейзаж с горами и рекой.",
    "Emoji party 🦊🎉✨ and numbers 12345 67890 3.14159.",
    "The quick brown fox jumps over the lazy dog. It's what they'll do, we've seen.",
    "user assistant system think\n\n</think>\n",
]
SAMPLE_PROMPTS = [  # unicode, empty, truncated, special tokens in user text
    "a red fox sitting in fresh snow, golden hour",
    "",
    "Café 東京 🦊🎉 — naïve «quotes» and\ttabs\nnew lines",
    "a long prompt that goes on " * 40,  # truncated at max_length
    "say <|im_end|> inside a prompt",  # special tokens in user text are matched, as in transformers
]

TINY_QWEN3 = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    rms_norm_eps=1e-6,
    max_position_embeddings=128,
    pad_token_id=0,
    rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
)


def make_tokenizer(folder: Path, template_file: bool = True) -> Path:
    """A byte-level BPE with Qwen's pipeline and special tokens, saved by transformers' Qwen2Tokenizer."""
    backend = Tokenizer(tokenizer_models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS, trainer)
    data = json.loads(backend.to_str())
    tokenizer = transformers.Qwen2Tokenizer(
        vocab=data["model"]["vocab"],
        merges=[tuple(m) for m in data["model"]["merges"]],
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        extra_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=QWEN3_TEMPLATE,
    )
    tokenizer.add_tokens(["<think>", "</think>"])  # added but not special, as in Qwen3
    tokenizer.save_pretrained(folder, save_jinja_files=template_file)
    return folder


def randomize_norms(model: torch.nn.Module, spread: float = 0.3, biases: bool = True) -> None:
    """Norm weights start at one, biases and pad tokens at zero: randomize them (torch's global generator) so a
    parity test sees them. A norm is a module whose class or own name says so (GroupNorm, RMSNorm, `q_norm`).
    Full-size models (benchmarks) take a smaller `spread` and keep their biases."""
    with torch.no_grad():
        for module_name, module in model.named_modules():
            is_norm = "norm" in type(module).__name__.lower() or "norm" in module_name.rpartition(".")[2]
            for name, p in module.named_parameters(recurse=False):
                if name == "bias":
                    if biases:
                        p.copy_(0.1 * torch.randn_like(p))
                elif is_norm:
                    p.copy_(1 + spread * torch.randn_like(p))
                elif "pad_token" in name:
                    p.normal_(0.0, 0.5)


def make_qwen3(
    folder: Path, seed: int = 0, base: bool = False, max_shard_size: str = "50GB", **overrides
) -> torch.nn.Module:
    """A random Qwen3ForCausalLM (or bare Qwen3Model) saved in the transformers layout; returns the torch model."""
    torch.manual_seed(seed)
    config = transformers.Qwen3Config(**{**TINY_QWEN3, **overrides})
    cls = transformers.Qwen3Model if base else transformers.Qwen3ForCausalLM
    model = cls(config).eval()
    randomize_norms(model)
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    return model


# The tiny parts of the families' pipeline checkpoints (their plugins' tests/tiny.py and the cache plugin's parity
# test), as diffusers' constructor arguments: the transformers are the smallest that keep every code path.
PIPELINE_VOCAB = 416  # make_tokenizer's vocabulary with its added tokens
KLEIN_TRANSFORMER = dict(
    patch_size=1,
    in_channels=16,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=48,
    timestep_guidance_channels=32,
    axes_dims_rope=[2, 2, 2, 2],
    guidance_embeds=False,
)
ZIMAGE_TRANSFORMER = dict(
    all_patch_size=(2,),
    all_f_patch_size=(1,),
    in_channels=4,
    dim=32,
    n_layers=2,
    n_refiner_layers=1,
    n_heads=2,
    n_kv_heads=2,
    cap_feat_dim=16,
    axes_dims=[8, 4, 4],
    axes_lens=[1024, 32, 32],
)
PIPELINE_VAE = dict(
    block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4, latent_channels=4, sample_size=32
)
# Z-Image's VAE is the FLUX.1 AutoencoderKL
ZIMAGE_VAE = dict(
    **PIPELINE_VAE,
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
)


def make_text_parts(folder: Path, layers: int) -> dict:
    """The tiny tokenizer and Qwen3 text encoder (`layers` layers) of a pipeline checkpoint, saved in
    folder/tokenizer and folder/text_encoder; returns them loaded, as diffusers' pipelines take them."""
    make_tokenizer(folder / "tokenizer")
    make_qwen3(
        folder / "text_encoder",
        vocab_size=PIPELINE_VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
    )
    return {
        "text_encoder": transformers.Qwen3ForCausalLM.from_pretrained(folder / "text_encoder").eval(),
        "tokenizer": transformers.AutoTokenizer.from_pretrained(folder / "tokenizer"),
    }


def draw(pipeline, prompt, latents, steps: int, size: tuple[int, int], **options) -> list:
    """imagegen's images from the given initial latents at size (width, height): a parity test's side."""
    return pipeline.generate(prompt, latents=latents, steps=steps, width=size[0], height=size[1], **options).images


def draw_reference(pipe, latents, steps: int, size: tuple[int, int], **kwargs) -> list:
    """diffusers' images from the same latents (numpy) at size (width, height); kwargs as the pipeline takes them."""
    latents = torch.from_numpy(latents)
    return pipe(latents=latents, num_inference_steps=steps, width=size[0], height=size[1], **kwargs).images


def assert_images_match(got: list, want: list, max_diff: int = 2) -> int:
    """Two lists of PIL images agree within `max_diff` (of 255) per pixel, and the reference is not flat (a
    flat picture would prove nothing). Prints and returns the largest difference."""
    import numpy as np

    assert len(got) == len(want), f"{len(got)} images vs {len(want)}"
    diff = max(int(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max()) for a, b in zip(got, want))
    spread = max(float(np.asarray(b, np.float32).std()) for b in want)
    print(f"max pixel difference {diff}/255 over {len(got)} images (reference std {spread:.1f})")
    assert spread > 5, "the reference images are flat: the comparison would prove nothing"
    assert diff <= max_diff, f"images differ by up to {diff}/255"
    return diff


def random_lora(
    shapes: dict[str, tuple[int, int]],
    rank: int = 4,
    seed: int = 0,
    std: float = 0.3,
    down: str = "lora_A.weight",
    up: str = "lora_B.weight",
    prefix: str = "",
    alpha: float | None = None,
) -> dict[str, torch.Tensor]:
    """Random LoRA factors for layers {name: (out, in)} under `prefix + name + "." + down/up` (and `.alpha`)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (out, inp) in shapes.items():
        tensors[f"{prefix}{name}.{down}"] = torch.randn(rank, inp, generator=generator) * std
        tensors[f"{prefix}{name}.{up}"] = torch.randn(out, rank, generator=generator) * std
        if alpha is not None:
            tensors[f"{prefix}{name}.alpha"] = torch.tensor(float(alpha))
    return tensors


def save_adapter(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """An adapter file as trainers write it (safetensors, contiguous float32 tensors)."""
    from safetensors.torch import save_file

    save_file({k: v.float().clone().contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def linear_shapes(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """{module name: (out, in)} of every torch Linear in a reference model."""
    return {name: tuple(m.weight.shape) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def sibling_module(test_file: str, name: str):
    """Import another test module of the same folder under a name unique to that folder (plugins' test folders
    reuse module names such as test_pipeline, which a plain import would confuse)."""
    import importlib.util
    import sys

    path = Path(test_file).with_name(f"{name}.py")
    unique = f"{path.parent.parent.name}_{name}".replace("-", "_")
    if unique not in sys.modules:
        spec = importlib.util.spec_from_file_location(unique, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[unique] = module
        spec.loader.exec_module(module)
    return sys.modules[unique]


def smooth_picture(width: int, height: int, seed: int = 0):
    """A smooth, varied RGB picture for img2img tests (random pixels would drown in a tiny VAE)."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width] / np.array([height, width])[:, None, None]
    phase = np.random.default_rng(seed).uniform(0, 6, 3)
    rgb = np.stack([np.sin(6 * x + p) * np.cos(4 * y - p) for p in phase], -1) * 0.5 + 0.5
    return Image.fromarray((rgb * 255).astype(np.uint8))


def invoke(*args: str, input: str | None = None):
    """Run the `imagegen` command in-process (typer's CliRunner); returns its Result."""
    from typer.testing import CliRunner

    from imagegen.cli import get_app

    return CliRunner().invoke(get_app(), list(args), input=input)


def one_line_error(result, *fragments: str) -> None:
    """A command failed the way users must see it: a non-zero exit and one line `Error: ...` holding each fragment,
    no traceback."""
    assert result.exit_code != 0, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("Error:") and "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
