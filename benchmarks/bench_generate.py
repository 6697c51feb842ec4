"""imagegen (MLX) vs diffusers (PyTorch) vs mflux (MLX) on one GPU, in one run: FLUX.2 Klein 4B / 9B and Z-Image
Turbo built full size from their real configs with random weights (no downloads), one JSON line per measurement.

    python3 benchmarks/bench_generate.py --models flux2-klein-4b [--sections step,e2e] [--out results.jsonl]
    python3 benchmarks/bench_generate.py --tiny          # tiny configs on the CPU: proves the code paths

Per model: a random checkpoint is written in the diffusers layout (torch, on the GPU, bfloat16) and loaded by both
imagegen and diffusers, so they share identical weights (the parity numbers); mflux builds its own transformer and
VAE classes with random weights. Timing follows benchmarks/README.md: warm-up, then the median of the repeats, with
MLX outputs evaluated and CUDA synchronized inside the timed region. Sections fail alone (the error is a record)."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from common import (
    Budget,
    Recorder,
    Runner,
    SkipSection,
    ensure_imports,
    errors,
    free_memory,
    header,
    image_difference,
    need,
    round_floats,
    time_torch,
)
from families import COST, FAMILIES, FULL, TINY, Family, family, to_numpy, to_torch, torch_device

SECTIONS = (
    "floor",
    "load",
    "encode",
    "step",
    "scaling",
    "batch",
    "refs",
    "decode",
    "e2e",
    "parity",
    "quant",
    "compile",
)
IMPLS = ("imagegen", "mflux", "diffusers")
QUANT_MODES = ("8", "4", "mxfp8", "nvfp4")
COMPILED_BY_DEFAULT = ("flux2-klein-4b",)  # torch.compile takes minutes: only where the issue quotes a number
PROMPT = (
    "A red fox sitting in fresh snow at dawn, photographed with a telephoto lens: soft golden light, "
    "detailed fur, frost on the whiskers, pine trees far behind, shallow depth of field."
)
# Seconds a section takes at Klein 4B full size (families.COST scales them), for the time budget
ESTIMATE = {
    "floor": 3,
    "setup": 45,
    "load": 20,
    "encode": 3,
    "step": 6,
    "scaling": 12,
    "batch": 6,
    "refs": 8,
    "decode": 4,
    "e2e": 10,
    "parity": 4,
    "quant": 25,
    "compile": 180,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default="flux2-klein-4b", help=f"comma list of {', '.join(FAMILIES)}")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    p.add_argument("--skip", default="", help="comma list of sections to leave out")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma list of {', '.join(IMPLS)}")
    p.add_argument("--quant-modes", default=",".join(QUANT_MODES), help="imagegen quantization modes to time")
    p.add_argument(
        "--pace",
        default="1,4",
        help="imagegen paced variants to time: host waits every N blocks (imagegen.nn.pacing); empty for none",
    )
    p.add_argument(
        "--pipeline-pace",
        type=int,
        default=None,
        help="pace of the imagegen pipelines (e2e, quant); default: the pipeline's own",
    )
    p.add_argument(
        "--torch-compile",
        choices=("auto", "on", "off"),
        default="auto",
        help=f"torch.compile the diffusers transformer (auto: {', '.join(COMPILED_BY_DEFAULT)} only)",
    )
    p.add_argument("--compile-mode", default="default", help="torch.compile mode (default, max-autotune, ...)")
    p.add_argument(
        "--budget-s",
        type=float,
        default=570.0,
        help="skip sections that would not finish within this many seconds of the start (0: no limit)",
    )
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 2; tiny 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs, median reported (default 5; tiny 1)")
    p.add_argument("--e2e-repeats", type=int, default=None, help="timed end-to-end runs (default 5; tiny 1)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/imagegen-bench"), help="random checkpoints go here")
    p.add_argument("--keep", action="store_true", help="keep the random checkpoints (default: delete after use)")
    p.add_argument("--reuse", action="store_true", help="use a checkpoint already in --workdir")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON lines to this file")
    p.add_argument("--tiny", action="store_true", help="tiny configs on the CPU (tests)")
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    args.sections = {s.strip() for s in args.sections.split(",") if s.strip()} - skip
    args.impls = {s.strip() for s in args.impls.split(",") if s.strip()}
    args.quant_modes = [s.strip() for s in args.quant_modes.split(",") if s.strip()]
    args.pace = [int(s) for s in args.pace.split(",") if s.strip()]
    unknown = (args.sections - set(SECTIONS)) | (args.impls - set(IMPLS)) | (set(args.models) - set(FAMILIES))
    if unknown:
        p.error(f"unknown: {', '.join(sorted(unknown))}")
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 2)
    args.repeats = args.repeats if args.repeats is not None else (1 if args.tiny else 5)
    args.e2e_repeats = args.e2e_repeats if args.e2e_repeats is not None else (1 if args.tiny else 5)
    return args


def shape_fields(fam: Family, size: int, batch: int = 1, refs: int = 0) -> dict[str, Any]:
    return {
        "size": f"{size}x{size}",
        "batch": batch,
        "refs": refs,
        "tokens": f"{fam.tokens(size, refs)}+{fam.scale.text_len}",
    }


class ModelBench:
    """Every section for one model: setup, then the imagegen, mflux and diffusers phases (one framework's weights
    resident at a time), each section a Runner.run call."""

    def __init__(self, model_id: str, args: argparse.Namespace, runner: Runner, floor: dict[str, float]):
        self.id, self.args, self.runner, self.floor = model_id, args, runner, floor
        self.fam = family(model_id, TINY if args.tiny else FULL)
        self.device = "cpu" if args.tiny else torch_device()
        self.scale = self.fam.scale
        self.folder = args.workdir / model_id
        self.ready = False
        self.pipe: Any = None  # the imagegen pipeline, while its phase runs
        self.parts: dict[str, Any] = {}  # imagegen components
        self.reference: dict[str, Any] = {}  # imagegen outputs kept for parity and quantization comparisons

    # -- helpers ----------------------------------------------------------------------------------
    def section(
        self, name: str, impl: str, body, estimate: str | None = None, required: bool = False, **fields: Any
    ) -> bool:
        runner = self.runner
        if required and name not in runner.sections:  # a prerequisite of selected sections
            runner = Runner(runner.recorder, runner.budget, runner.sections | {name}, runner.cost)
        return runner.run(name, self.id, impl, body, ESTIMATE.get(estimate or name, 0), **fields)

    def timing(self, t, fam_fields: dict[str, Any], flops: float | None = None) -> dict[str, Any]:
        record = {**fam_fields, **t.record()}
        if flops:
            record["gflop"] = flops / 1e9
            record["tflops"] = flops / (t.ms / 1e3) / 1e12
            if self.floor.get("mlx"):
                floor_ms = flops / (self.floor["mlx"] * 1e12) * 1e3
                record.update(floor_ms=floor_ms, floor_ratio=t.ms / floor_ms)
        if record.get("batch", 1) > 1:
            record["per_image_ms"] = t.ms / record["batch"]
        return round_floats(record)

    def pipeline_options(self) -> dict[str, Any]:
        return {} if self.args.pipeline_pace is None else {"pace": self.args.pipeline_pace}

    def restore_pace(self, transformer: Any) -> None:
        """Give the pipeline back its own pacing after a variant changed the (shared) transformer's."""
        if self.pipe is not None:
            self.pipe.pace(self.pipe.paced)
        else:
            transformer.pace(0)

    def wants(self, *names: str) -> bool:
        return any(n in self.runner.sections for n in names)

    def step_shapes(self) -> list[tuple[str, int, int, int]]:
        """(section, size, batch, refs) of every step measurement after the main one."""
        s = self.scale
        shapes = [("scaling", size, 1, 0) for size in s.sizes] + [("batch", s.size, s.batch, 0)]
        if self.fam.has_refs:
            shapes += [("refs", s.size, 1, 1), ("refs", s.size, 1, 2)]
        return [shape for shape in shapes if shape[0] in self.runner.sections]

    # -- the run ----------------------------------------------------------------------------------
    def run(self) -> None:
        self.setup()
        if "imagegen" in self.args.impls:
            self.imagegen_phase()
            self.quant_phase()
        if "mflux" in self.args.impls:
            self.mflux_phase()
        if "diffusers" in self.args.impls:
            self.diffusers_phase()
        if not self.args.keep and self.folder.exists():
            shutil.rmtree(self.folder, ignore_errors=True)

    def setup(self) -> None:
        def body():
            need("torch"), need("diffusers"), need("transformers")
            if self.args.reuse and (self.folder / "model_index.json").is_file():
                yield {"reused": str(self.folder)}
                return
            shutil.rmtree(self.folder, ignore_errors=True)
            start = time.perf_counter()
            self.fam.write_folder(self.folder, self.device)
            size = sum(p.stat().st_size for p in self.folder.rglob("*") if p.is_file())
            yield {
                "s": round(time.perf_counter() - start, 2),
                "folder_gb": round(size / 1e9, 2),
                "folder": str(self.folder),
            }

        needs_folder = set(SECTIONS) - {"floor"}  # every section but the GEMM floor times a checkpoint
        if self.wants(*needs_folder) and self.args.impls & {"imagegen", "diffusers"}:
            self.ready = self.section("setup", "torch", body, required=True)

    # -- imagegen ----------------------------------------------------------------------------------
    def imagegen_phase(self) -> None:
        if not self.ready:
            return
        from imagegen.cli.bench import time_mlx

        def load():
            from imagegen import registry

            spec = registry.get(self.id)
            mx.reset_peak_memory()
            start = time.perf_counter()
            self.pipe = spec.pipeline(weights=self.folder, dtype="bfloat16", **self.pipeline_options())
            seconds = time.perf_counter() - start
            yield {"s": round(seconds, 2), "peak_gb": round(mx.get_peak_memory() / 1e9, 3)}

        self.section("load", "imagegen", load, required=True)

        def components():
            start = time.perf_counter()
            self.parts = self.fam.imagegen_components(self.pipe, self.folder)
            if self.pipe is None:
                yield {"s": round(time.perf_counter() - start, 2), "note": "no imagegen pipeline: components loaded"}

        if not self.section("load", "imagegen-components", components, required=True):
            return
        w, r = self.args.warmup, self.args.repeats
        size = self.scale.size

        def encode(layers, label):
            encoder = self.parts["text_encoder"]

            def fn():
                encoder.clear_cache()
                return encoder.encode([PROMPT], layers, self.fam.max_length, self.fam.thinking)

            t = time_mlx(fn, w, r)
            used = max(encoder.model.resolve_layers(layers))
            yield {**t.record(), "layers": label, "layers_run": used, "tokens": self.fam.max_length}

        self.section("encode", "imagegen", lambda: encode(self.fam.text_layers, "pipeline"))

        transformer = self.parts["transformer"]

        def step(section_shapes):
            for _, sz, batch, refs in section_shapes:
                inputs = self.fam.step_inputs(sz, batch, refs)
                flops = self.fam.flops(sz, self.scale.text_len, batch, refs)
                default_shape = (sz, batch, refs) == (size, 1, 0)
                variants = [(True, 0), (False, 0)] if default_shape else [(True, 0)]
                variants += [(True, k) for k in self.args.pace] if default_shape else []
                for compiled, pace in variants:
                    fn = self.fam.imagegen_step(transformer, inputs, compiled, pace)
                    t = time_mlx(fn, w, r)
                    self.restore_pace(transformer)
                    impl = f"imagegen-paced{pace}" if pace else "imagegen" if compiled else "imagegen-eager"
                    yield {"impl": impl, **self.timing(t, shape_fields(self.fam, sz, batch, refs), flops)}

        def pipeline_step():
            from imagegen.cli.bench import time_step

            request = self.pipe.request(PROMPT, width=size, height=size, seed=0)
            t, _ = time_step(self.pipe, request, w, r)
            tokens = self.prompt_tokens()
            yield {
                **t.record(),
                "size": f"{size}x{size}",
                "batch": 1,
                "refs": 0,
                "tokens": f"{self.fam.tokens(size)}+{tokens}",
                "note": "one iteration of the pipeline's own loop",
            }

        self.section("step", "imagegen", lambda: step([("step", size, 1, 0)]))
        if self.pipe is not None:
            self.section("step", "imagegen-pipeline", pipeline_step)
        for name in dict.fromkeys(s[0] for s in self.step_shapes()):
            self.section(name, "imagegen", lambda n=name: step([s for s in self.step_shapes() if s[0] == n]))

        def capture():
            inputs = self.fam.step_inputs(size)
            out = self.fam.imagegen_step(transformer, inputs, True, self.pipe.paced if self.pipe else 0)()
            self.reference["transformer"] = to_numpy(out)
            encoder = self.parts["text_encoder"]
            tokens = encoder.tokenizer.encode_prompts([PROMPT], self.fam.max_length, self.fam.thinking)
            layers = encoder.model.resolve_layers(self.fam.text_layers)
            hidden = encoder.model.forward_with_layer_outputs(tokens.ids, tokens.mask, layers)
            self.reference["tokens"] = (np.array(tokens.ids), np.array(tokens.mask))
            self.reference["text"] = {i: to_numpy(h) for i, h in zip(layers, hidden)}
            z = mx.array(self.fam.vae_latents(size)).transpose(0, 2, 3, 1).astype(mx.bfloat16)
            self.reference["vae"] = to_numpy(self.parts["vae"].decode(z)).transpose(0, 3, 1, 2)
            finite = bool(np.isfinite(self.reference["transformer"]).all())
            yield {"what": "outputs kept for the comparison with diffusers", "transformer_finite": finite}

        self.section("parity", "imagegen", capture)

        def decode():
            vae = self.parts["vae"]
            z = mx.array(self.fam.vae_latents(size)).transpose(0, 2, 3, 1).astype(mx.bfloat16)
            # not compiled: the decoder evaluates layer by layer to bound its peak memory
            yield {"impl": "imagegen", "size": f"{size}x{size}", **time_mlx(lambda: vae.decode(z), w, r).record()}

        self.section("decode", "imagegen", decode)
        if self.pipe is not None:
            self.section("e2e", "imagegen", self.imagegen_e2e)
        # Last: running every layer loads those the pipeline leaves on disk, and they stay resident after
        self.section("encode", "imagegen", lambda: encode((-1,), "all"))
        self.parts.clear()

    def imagegen_e2e(self):
        from imagegen.cli.bench import clear_prompt_cache, time_mlx

        size, steps, pipe = self.scale.size, self.fam.default_steps, self.pipe
        images = {}

        def generate(cached: bool = False):
            if not cached:
                clear_prompt_cache(pipe)
            result = pipe.generate(PROMPT, width=size, height=size, steps=steps, seed=0)
            images["last"], images["timings"] = result.images[0], result.timings
            return result.images

        fields = {
            "size": f"{size}x{size}",
            "steps": steps,
            "prompt_tokens": self.prompt_tokens(),
            "pace": getattr(pipe, "paced", None),
        }
        t = time_mlx(generate, 1, self.args.e2e_repeats)
        self.reference["image"] = images["last"]
        stages = {k: round(v * 1e3, 2) for k, v in images["timings"].items()}
        yield {**fields, **t.record(), "stages_ms": stages}
        t = time_mlx(lambda: generate(cached=True), 1, self.args.e2e_repeats)
        yield {"impl": "imagegen-cached-prompt", **fields, **t.record()}
        for pace in [p for p in self.args.pace if p != pipe.paced]:
            pipe.pace(pace)
            t = time_mlx(generate, 1, self.args.e2e_repeats)
            stages = {k: round(v * 1e3, 2) for k, v in images["timings"].items()}
            yield {"impl": f"imagegen-paced{pace}", **fields, **t.record(), "stages_ms": stages}
        self.restore_pace(pipe.transformer)
        if "parity" in self.runner.sections:
            latents = self.fam.noise(size)
            self.reference["latents_image"] = pipe.generate(
                PROMPT, width=size, height=size, steps=steps, latents=latents
            ).images[0]

    def prompt_tokens(self) -> int:
        """Text tokens the pipeline feeds the transformer for PROMPT: all max_length (Klein) or the prompt's own."""
        encoder = self.pipe.text_encoder
        tokens = encoder.tokenizer.encode_prompts([PROMPT], self.fam.max_length, self.fam.thinking)
        return self.fam.max_length if self.fam.pads_prompt else tokens.lengths[0]

    def quant_phase(self) -> None:
        """Quantized imagegen: load time, step time, end-to-end time and peak memory, image difference vs bf16."""
        self.pipe = None
        free_memory()
        if not (self.ready and "quant" in self.runner.sections):
            return
        from imagegen.cli.bench import clear_prompt_cache, time_mlx

        size, steps = self.scale.size, self.fam.default_steps
        inputs = self.fam.step_inputs(size)
        flops = self.fam.flops(size, self.scale.text_len)

        def body(mode: str):
            from imagegen import UnknownModelError, registry

            mx.reset_peak_memory()
            start = time.perf_counter()
            try:
                pipe = registry.get(self.id).pipeline(
                    weights=self.folder, dtype="bfloat16", quantize=mode, **self.pipeline_options()
                )
                transformer = pipe.transformer
            except UnknownModelError as e:  # no pipeline for this family: the transformer alone
                pipe, note = None, f"transformer only ({e})"
                transformer = self.fam.imagegen_transformer(self.folder, quantize=mode)
            load_s = time.perf_counter() - start
            yield {"what": "load", "s": round(load_s, 2), "peak_gb": round(mx.get_peak_memory() / 1e9, 3)}
            t = time_mlx(
                self.fam.imagegen_step(transformer, inputs, True, pipe.paced if pipe else 0),
                self.args.warmup,
                self.args.repeats,
            )
            yield {"what": "step", **self.timing(t, shape_fields(self.fam, size), flops)}
            if pipe is None:
                yield {"what": "e2e", "skipped": note}
                return
            last = {}

            def generate():
                clear_prompt_cache(pipe)
                last["image"] = pipe.generate(PROMPT, width=size, height=size, steps=steps, seed=0).images[0]
                return []

            repeats = min(self.args.e2e_repeats, 3)
            t = time_mlx(generate, 1, repeats)
            diff = image_difference(last["image"], self.reference["image"]) if "image" in self.reference else {}
            yield {
                "what": "e2e",
                "size": f"{size}x{size}",
                "steps": steps,
                **t.record(),
                **round_floats(diff),
                "vs": "bfloat16 image, same seed",
                "note": "fewer end-to-end repeats" if repeats < 5 else None,
            }

        for mode in self.args.quant_modes:
            self.section(
                "quant",
                f"imagegen-{mode}" + ("bit" if mode.isdigit() else ""),
                lambda mode=mode: body(mode),
                quantize=mode,
            )

    # -- mflux -------------------------------------------------------------------------------------
    def mflux_phase(self) -> None:
        from imagegen.cli.bench import time_mlx

        w, r, size = self.args.warmup, self.args.repeats, self.scale.size
        model: dict[str, Any] = {}

        def load():
            need("mflux")
            start = time.perf_counter()
            model["transformer"] = self.fam.mflux_transformer()
            yield {"s": round(time.perf_counter() - start, 2), "note": "random init (mflux classes), not a load"}

        if self.wants("load", "step", "scaling", "batch", "refs"):
            self.section("load", "mflux", load, required=True)

        def step(shapes):
            for _, sz, batch, refs in shapes:
                inputs = self.fam.step_inputs(sz, batch, refs)
                flops = self.fam.flops(sz, self.scale.text_len, batch, refs)
                variants = (False, True) if (sz, batch, refs) == (size, 1, 0) else (True,)
                for compiled in variants:
                    try:
                        fn = self.fam.mflux_step(model["transformer"], inputs, compiled)
                    except ValueError as e:
                        raise SkipSection(str(e)) from None
                    t = time_mlx(fn, w, r)
                    impl = "mflux-compile" if compiled else "mflux"
                    yield {"impl": impl, **self.timing(t, shape_fields(self.fam, sz, batch, refs), flops)}

        if "transformer" in model:
            self.section("step", "mflux", lambda: step([("step", size, 1, 0)]))
            for name in dict.fromkeys(s[0] for s in self.step_shapes()):
                self.section(name, "mflux", lambda n=name: step([s for s in self.step_shapes() if s[0] == n]))
        model.clear()
        free_memory()

        def decode():
            need("mflux")
            from mflux.models.common.vae.block_decoder import VAEBlockDecoder

            vae = self.fam.mflux_vae()
            z = mx.array(self.fam.mflux_latents(size)).astype(mx.bfloat16)
            side = z.shape[-1] * 8
            variants = (
                ("mflux", VAEBlockDecoder.LOW_MEMORY, False),
                ("mflux-legacy", VAEBlockDecoder.LEGACY, False),
                ("mflux-legacy-compile", VAEBlockDecoder.LEGACY, True),
            )
            for impl, mode, compiled in variants:
                vae.decode_mode = mode
                fn = mx.compile(vae.decode) if compiled else vae.decode
                yield {
                    "impl": impl,
                    "size": f"{side}x{side}",
                    "decode_mode": mode,
                    **time_mlx(lambda fn=fn: fn(z), w, r).record(),
                }

        self.section("decode", "mflux", decode)

    # -- diffusers ---------------------------------------------------------------------------------
    def diffusers_phase(self) -> None:
        if not self.ready:
            return
        w, r, size = self.args.warmup, self.args.repeats, self.scale.size
        device = self.device
        state: dict[str, Any] = {}

        def load():
            torch = need("torch")
            need("diffusers")
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            state["pipe"] = self.fam.diffusers_pipeline(self.folder, device)
            seconds = time.perf_counter() - start
            peak = torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None
            yield {"s": round(seconds, 2), "peak_gb": peak}

        if not self.section("load", "diffusers", load, required=True):
            return
        pipe = state["pipe"]

        def encode():
            t = time_torch(lambda: self.fam.diffusers_encode(pipe, PROMPT, device), w, r)
            layers = pipe.text_encoder.config.num_hidden_layers
            yield {**t.record(), "layers": "all", "layers_run": layers, "tokens": self.fam.max_length}

        self.section("encode", "diffusers", encode)

        def step(shapes):
            for _, sz, batch, refs in shapes:
                inputs = self.fam.step_inputs(sz, batch, refs)
                fn = self.fam.diffusers_step(pipe.transformer, inputs, device)
                t = time_torch(fn, w, r)
                flops = self.fam.flops(sz, self.scale.text_len, batch, refs)
                yield self.timing(t, shape_fields(self.fam, sz, batch, refs), flops)

        self.section("step", "diffusers", lambda: step([("step", size, 1, 0)]))
        self.section("parity", "imagegen-vs-diffusers", lambda: self.parity(pipe, device))
        for name in dict.fromkeys(s[0] for s in self.step_shapes()):
            self.section(name, "diffusers", lambda n=name: step([s for s in self.step_shapes() if s[0] == n]))

        def decode():
            z = to_torch(self.fam.vae_latents(size), device, pipe.vae.dtype)
            t = time_torch(lambda: pipe.vae.decode(z, return_dict=False)[0], w, r)
            yield {"size": f"{size}x{size}", **t.record()}

        self.section("decode", "diffusers", decode)

        def e2e():
            steps = self.fam.default_steps
            t = time_torch(lambda: self.fam.diffusers_generate(pipe, PROMPT, size, steps), 1, self.args.e2e_repeats)
            yield {"size": f"{size}x{size}", "steps": steps, **t.record()}

        self.section("e2e", "diffusers", e2e)
        if self.args.torch_compile == "on" or (self.args.torch_compile == "auto" and self.id in COMPILED_BY_DEFAULT):
            self.section("compile", "diffusers-compile", lambda: self.torch_compile(pipe, device))
        state.clear()
        pipe = None

    def parity(self, pipe: Any, device: str):
        """imagegen vs diffusers/transformers on identical weights and inputs, both bfloat16."""
        import torch

        if "transformer" not in self.reference:
            raise SkipSection("the imagegen outputs were not captured (parity section of the imagegen phase)")
        size = self.scale.size
        with torch.inference_mode():
            want = to_numpy(self.fam.diffusers_step(pipe.transformer, self.fam.step_inputs(size), device)())
            yield {
                "what": "transformer step",
                **shape_fields(self.fam, size),
                **round_floats(errors(self.reference["transformer"], want)),
            }
            ids, mask = (to_torch(a, device) for a in self.reference["tokens"])
            out = pipe.text_encoder(input_ids=ids.long(), attention_mask=mask.long(), output_hidden_states=True)
            for layer, got in self.reference["text"].items():
                e = errors(got, to_numpy(out.hidden_states[layer]))
                yield {"what": f"text encoder hidden state {layer}", **round_floats(e)}
            z = to_torch(self.fam.vae_latents(size), device, pipe.vae.dtype)
            want = to_numpy(pipe.vae.decode(z, return_dict=False)[0])
            yield {"what": "vae decode", "size": f"{size}x{size}", **round_floats(errors(self.reference["vae"], want))}
        if "latents_image" in self.reference:
            latents = to_torch(self.fam.noise(size), device, torch.bfloat16)
            image = self.fam.diffusers_generate(pipe, PROMPT, size, self.fam.default_steps, latents=latents)[0]
            yield {
                "what": "image, same latents",
                "size": f"{size}x{size}",
                **round_floats(image_difference(self.reference["latents_image"], image)),
            }

    def torch_compile(self, pipe: Any, device: str):
        import torch

        size = self.scale.size
        backend = "eager" if self.scale.tiny else "inductor"  # tiny runs prove the path; inductor takes minutes
        eager = pipe.transformer
        pipe.transformer = torch.compile(
            eager, mode=None if self.args.compile_mode == "default" else self.args.compile_mode, backend=backend
        )
        fn = self.fam.diffusers_step(pipe.transformer, self.fam.step_inputs(size), device)
        start = time.perf_counter()
        with torch.no_grad():
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
        compile_s = time.perf_counter() - start
        t = time_torch(fn, self.args.warmup, self.args.repeats)
        flops = self.fam.flops(size, self.scale.text_len)
        yield {
            "what": "step",
            "compile_s": round(compile_s, 1),
            "backend": backend,
            "mode": self.args.compile_mode,
            **self.timing(t, shape_fields(self.fam, size), flops),
        }
        if "e2e" in self.runner.sections:
            steps = self.fam.default_steps
            start = time.perf_counter()
            self.fam.diffusers_generate(pipe, PROMPT, size, steps)  # a recompile would show here
            first_s = time.perf_counter() - start
            t = time_torch(lambda: self.fam.diffusers_generate(pipe, PROMPT, size, steps), 0, self.args.e2e_repeats)
            yield {
                "what": "e2e",
                "size": f"{size}x{size}",
                "steps": steps,
                "first_run_s": round(first_s, 2),
                **t.record(),
            }
        pipe.transformer = eager


def measure_floor(runner: Runner, tiny: bool) -> dict[str, float]:
    """bf16 GEMM rate (n x n x n) in MLX, and in torch for reference: the hardware floor of a step is its FLOPs at the
    MLX rate."""
    from imagegen.cli.bench import time_mlx

    n = 256 if tiny else 8192
    rates: dict[str, float] = {}

    def mlx_body():
        a, b = (mx.random.normal((n, n)).astype(mx.bfloat16) for _ in range(2))
        t = time_mlx(lambda: a @ b, 2, 10)
        rates["mlx"] = 2 * n**3 / (t.ms / 1e3) / 1e12
        yield {"shape": f"{n}x{n}x{n}", **t.record(), "tflops": round(rates["mlx"], 1)}

    def torch_body():
        torch = need("torch")
        device = "cpu" if tiny else torch_device()
        a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
        t = time_torch(lambda: a @ b, 2, 10)
        rates["torch"] = 2 * n**3 / (t.ms / 1e3) / 1e12
        yield {"shape": f"{n}x{n}x{n}", **t.record(), "tflops": round(rates["torch"], 1)}

    runner.run("floor", "-", "mlx", mlx_body, ESTIMATE["floor"])
    runner.run("floor", "-", "torch", torch_body, ESTIMATE["floor"])
    return rates


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.tiny:
        mx.set_default_device(mx.cpu)
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # torch's CPU threads and MLX's fight on a small machine
    ensure_imports()
    recorder = Recorder(args.out)
    recorder.emit(header({k: sorted(v) if isinstance(v, set) else v for k, v in vars(args).items()}))
    budget = Budget(args.budget_s)
    start = time.perf_counter()
    floor = measure_floor(Runner(recorder, budget, args.sections), args.tiny)
    for model_id in args.models:
        runner = Runner(recorder, budget, args.sections, 1.0 if args.tiny else COST[model_id])
        try:
            ModelBench(model_id, args, runner, floor).run()
        except Exception as e:  # a bug outside any section: record it and go on to the next model
            recorder.emit({"section": "run", "model": model_id, "error": f"{type(e).__name__}: {e}"})
        free_memory()
    recorder.emit(
        {
            "section": "done",
            "elapsed_s": round(time.perf_counter() - start, 1),
            "error_count": sum(1 for r in recorder.records if "error" in r),
            "skipped_count": sum(1 for r in recorder.records if "skipped" in r),
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
