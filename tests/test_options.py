"""The option walk: every declared option (core and a family's) reaches Python, the CLI, the server, batch, the
PNG metadata and `imagegen run --from`, from its one declaration; and the shared check refuses bad values."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import imagegen
from imagegen import plugins, registry
from imagegen.batch import Defaults, parse_row
from imagegen.cli import get_app
from imagegen.image import read_metadata, to_pil
from imagegen.lora import whole
from imagegen.options import BY_NAME, OPTIONS, SEED_MAX, Option, OptionError, image_ref
from imagegen.request import replayed
from imagegen.server.errors import APIError
from imagegen.server.schemas import ImageOptions
from imagegen.server.service import ImageService
from imagegen.server.settings import Limits

FAMILY = (
    Option("strength_x", "float", "A family number.", minimum=0, maximum=1),
    Option("mode_x", "choice", "A family enum.", choices=("soft", "hard")),
    Option("names_x", "str", "A family list.", repeatable=True),
    Option("flag_x", "bool", "A family switch."),
    Option("file_x", "file", "A family file (e.g. adapter weights)."),
)
PYTHON_ONLY = {"latents"}  # arrays: no text form, so no CLI flag, field, row key or metadata entry
# options of kind "any": a valid value each (the walk fixture writes the LoRA file)
SAMPLES = {"loras": ["style.safetensors:0.5"], "outpaint": "8,0,8,0", "noise_slot": [0, 2]}
# options that only make sense beside another one: walked with it
NEEDS = {
    "mask": {"init_image": "ref.png"},
    "strength": {"init_image": "ref.png"},
    "outpaint": {"init_image": "ref.png"},
    "noise_slot": {"noise": "torch"},
}


class Walker(nn.Module):
    """The walk model's denoiser: one Linear that LoRA files can adapt."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)


class WalkPipeline(imagegen.Pipeline):
    """Draws a flat image; the walk checks the request each front end builds, not pixels."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.transformer = Walker()

    def encode(self, request: imagegen.Request) -> None:
        return None

    def prepare_latents(self, request: imagegen.Request) -> mx.array:
        return self.initial_latents(request, (request.batch_size, request.height, request.width, 3))

    def denoise_steps(self, request: imagegen.Request, conditioning: None, latents: mx.array) -> Iterator[mx.array]:
        for _ in range(request.steps):
            yield latents * 0.5

    def decode(self, request: imagegen.Request, latents: mx.array) -> list:
        return to_pil(latents)


class WalkPlugin:
    @imagegen.hookimpl
    def register_models(self, register) -> None:
        gated = frozenset(o.name for o in OPTIONS if o.gated)
        register(
            imagegen.ModelSpec(
                id="walk",
                family="walk",
                load=lambda spec, weights, **kw: WalkPipeline(spec, weights, **kw),
                needs_weights=False,
                default_steps=2,
                default_size=(32, 32),
                default_dtype="float32",
                tasks=(imagegen.TEXT_TO_IMAGE, imagegen.IMAGE_EDIT),
                options=gated,
                extra_options=FAMILY,
                lora_targets=lambda transformer: {"diffusers": {"proj": whole("proj")}},
            )
        )


@pytest.fixture(autouse=True)
def walk_plugin(tmp_path, monkeypatch):
    plugins.register_plugin(WalkPlugin(), "walk", "imagegen-walk-test", "0.0.1")
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (32, 32), (200, 30, 10)).save("ref.png")
    mx.save_safetensors(
        "style.safetensors", {"proj.lora_A.weight": mx.ones((1, 4)), "proj.lora_B.weight": mx.ones((4, 1))}
    )
    yield
    plugins.unregister_plugin("walk")


def sample(option: Option) -> object:
    """A valid value that is not the default, by kind (so an option added later is walked without edits here)."""
    if option.name in SAMPLES:
        return SAMPLES[option.name]
    one = {
        "int": int(option.minimum or 0) + 2,
        "float": 0.5 if option.maximum is None or option.maximum >= 0.5 else option.maximum,
        "bool": True,
        "str": "blur",
        "choice": option.choices[-1] if option.choices else "",
        "image": "ref.png",
        "file": "ref.png",
    }[option.kind]
    if option.name in ("width", "height"):
        one = 48
    return [one, "other"] if option.repeatable and option.kind == "str" else [one] if option.repeatable else one


def expected(option: Option, value: object) -> object:
    """The value as metadata records it."""
    if option.dump is not None:
        return option.to_json(option.check(value))
    if option.kind in ("image", "file"):
        return [Path(v).name for v in value] if option.repeatable else Path(value).name
    return list(value) if option.repeatable else value


def walked() -> list[Option]:
    options = [o for o in OPTIONS if o.name not in PYTHON_ONLY] + list(FAMILY)
    assert all(o.fronts for o in options), "an option that travels nowhere must be listed in PYTHON_ONLY"
    return options


def metadata_value(meta: dict, option: Option) -> object:
    return meta[option.name] if option in OPTIONS else meta["options"][option.name]


def cli_args(option: Option, value: object) -> list[str]:
    """The option's flags, after those of the options it needs."""
    needed = [a for name, v in NEEDS.get(option.name, {}).items() for a in (BY_NAME[name].cli_flag, str(v))]
    return needed + own_flags(option, value)


def own_flags(option: Option, value: object) -> list[str]:
    if option in FAMILY:
        return ["-O", f"{option.name}={json.dumps(value) if not isinstance(value, str) else value}"]
    if option.kind == "bool":
        return [option.cli_flag]
    values = value if option.repeatable else [value]
    return [a for v in values for a in (option.cli_flag, str(v))]


@pytest.mark.parametrize("option", walked(), ids=lambda o: o.name)
def test_every_option_walks_through_every_front_end(option):
    value = sample(option)
    spec = registry.get("walk")
    family = option in FAMILY

    needs = NEEDS.get(option.name, {})

    # Python: the request carries the checked value
    request = spec.request("x", **{option.name: value}, **needs)
    got = request.option(option.name)
    if option.kind == "image":
        names = [image_ref(i)["name"] for i in got] if option.repeatable else image_ref(got)["name"]
        assert names == expected(option, value)
    elif option.kind == "file":
        assert got == Path(value)
    elif option.name != "num_images":
        assert got == option.check(value)

    # CLI flag -> PNG metadata -> --from replays it
    if "cli" in option.fronts:
        result = CliRunner().invoke(get_app(), ["run", "-m", "walk", "x", "-o", "a.png", *cli_args(option, value)])
        assert result.exit_code == 0, result.output
        if option.name == "num_images":
            assert len(list(Path().glob("a*.png"))) == value
            return  # each image replays alone: the count is not metadata
        meta = read_metadata("a.png")
        assert metadata_value(meta, option) == expected(option, value)
        if option.kind in ("image", "file"):
            assert meta["inputs"] == {"ref.png": imagegen.options.file_ref("ref.png")["sha256"]}
        again = CliRunner().invoke(get_app(), ["run", "--from", "a.png", "-o", "b.png"])
        assert again.exit_code == 0, again.output
        assert metadata_value(read_metadata("b.png"), option) == expected(option, value)
        assert np.array_equal(np.asarray(Image.open("a.png")), np.asarray(Image.open("b.png")))

    # server: a JSON field (the family's under `options`), or a multipart upload for images -> the same request
    if option.kind == "image" and "server" in option.fronts:
        uploads = [imagegen.options.image_input(Path(v)) for v in (value if option.repeatable else [value])]
        plan = ImageService(Limits(), None).plan(
            ImageOptions(prompt="x", model="walk"), "text-to-image", files={option.name: uploads}
        )
        names = (
            [image_ref(i)["name"] for i in plan.request.option(option.name)]
            if option.repeatable
            else image_ref(plan.request.option(option.name))["name"]
        )
        assert names == expected(option, value)
    elif option.kind == "file":  # a client must not name files on the server
        with pytest.raises(APIError, match="cannot be given over HTTP"):
            ImageService(Limits(), None).plan(
                ImageOptions(prompt="x", model="walk", options={option.name: value}), "text-to-image"
            )
    elif "server" in option.fronts or family:
        fields = {"options": {option.name: value}} if family else {option.name: value}
        assert family or option.name in ImageOptions.model_fields
        edit = "init_image" in needs  # the server's init image is the edit's first upload
        images = [imagegen.options.image_input(Path(needs["init_image"]))] if edit else []
        plan = ImageService(Limits(), None).plan(
            ImageOptions(prompt="x", model="walk", **fields), "image-edit" if edit else "text-to-image", images
        )
        assert plan.request.option(option.name) == request.option(option.name)

    # batch: a row key (the family's under `options`) -> the same request
    if "batch" in option.fronts or family:
        given = {"options": {option.name: value}} if family else {option.name: value}
        row = {"prompt": "x", "model": "walk", **given, **needs}
        parsed = parse_row(json.dumps(row), 1, Defaults(), folder=Path.cwd())
        from_row = spec.request("x", **parsed.options())
        if option.kind == "image":
            got = from_row.option(option.name)
            names = [image_ref(i)["name"] for i in got] if option.repeatable else image_ref(got)["name"]
            assert names == expected(option, value)
        elif option.kind == "file":  # taken relative to the prompts file's folder (here the current one)
            assert from_row.option(option.name) == Path.cwd() / request.option(option.name)
        else:
            assert from_row.option(option.name) == request.option(option.name)


def test_replay_refuses_an_image_whose_content_changed(tmp_path):
    assert CliRunner().invoke(get_app(), ["run", "-m", "walk", "x", "-o", "a.png", "--image", "ref.png"]).exit_code == 0
    Image.new("RGB", (32, 32), (0, 0, 0)).save("ref.png")  # same name, other content
    result = CliRunner().invoke(get_app(), ["run", "--from", "a.png", "-o", "b.png"])
    assert result.exit_code == 1 and "ref.png" in result.output and "pass it again" in result.output
    assert not Path("b.png").exists()
    with pytest.raises(imagegen.InvalidOptionError, match="ref.png"):
        replayed(registry.get("walk"), read_metadata("a.png"), [tmp_path / "nowhere"])


@pytest.mark.parametrize(
    "options,python,cli,param",
    [
        ({"strength_x": 2}, "strength_x must be within [0, 1], got 2", ["-O", "strength_x=2"], "strength_x"),
        ({"mode_x": "medium"}, "mode_x must be one of soft, hard", ["-O", "mode_x=medium"], "mode_x"),
        ({"steps": "3"}, "steps must be an integer", None, "steps"),
        ({"tile": "yes"}, "tile must be true or false", None, "tile"),
        ({"guidance": float("inf")}, "guidance must be a finite number", None, "guidance"),
        ({"seed": SEED_MAX + 1}, f"seed must be <= {SEED_MAX}", ["--seed", str(SEED_MAX + 1)], "seed"),
        (
            {"seed": SEED_MAX, "num_images": 2},
            f"seed must be <= {SEED_MAX - 1} for 2 images",
            ["--seed", str(SEED_MAX), "-n", "2"],
            "seed",
        ),
        ({"seed": 2**64}, "seed must be <=", ["--seed", str(2**64)], "seed"),
    ],
)
def test_one_check_one_message_everywhere(options, python, cli, param):
    with pytest.raises(OptionError) as e:
        registry.get("walk").request("x", **options)
    assert python in str(e.value) and e.value.name == param
    if cli is not None:
        result = CliRunner().invoke(get_app(), ["run", "-m", "walk", "x", *cli])
        assert result.exit_code == 1 and "Traceback" not in result.output and "must be" in result.output
    body = {"prompt": "x", "model": "walk", **({"options": options} if param.endswith("_x") else options)}
    try:
        fields = ImageOptions.model_validate(body)
    except ValueError:
        return  # the JSON schema already refuses it (a 400 from the app)
    if not param.endswith("_x") and getattr(fields, param) != options[param]:
        return  # coerced by the schema ("3" -> 3): strict JSON types are the app's concern
    with pytest.raises(APIError) as e:
        ImageService(Limits(), None).plan(fields, "text-to-image")
    assert e.value.status == 400 and e.value.param == param


def test_seed_range_is_one_range():
    spec = registry.get("walk")
    assert spec.request("x", seed=SEED_MAX).seeds == (SEED_MAX,)
    plan = ImageService(Limits(), None).plan(ImageOptions(prompt="x", model="walk", seed=2**31), "text-to-image")
    assert plan.request.seeds == (2**31,)  # the server used to stop at 2**31 - 1
    result = CliRunner().invoke(get_app(), ["run", "-m", "walk", "x", "--seed", str(SEED_MAX), "-o", "s.png"])
    assert result.exit_code == 0 and read_metadata("s.png")["seed"] == SEED_MAX
    row = parse_row(json.dumps({"prompt": "x", "seed": SEED_MAX + 1}), 1, Defaults(model="walk"))
    with pytest.raises(OptionError, match="seed must be"):
        spec.request(row.prompt, **row.options())


def test_unsupported_options_name_the_model():
    registry.invalidate()
    with pytest.raises(imagegen.InvalidOptionError, match="'flux2-demo' does not support the option 'guidance'"):
        registry.get("flux2-demo").request("x", guidance=2.0)
    with pytest.raises(imagegen.InvalidOptionError, match="does not support the option.s.: strength_x"):
        registry.get("flux2-demo").request("x", strength_x=0.5)


def test_batch_flags_are_derived_too():
    Path("p.jsonl").write_text('{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": "y", "tile": false, "seed": 9}\n')
    result = CliRunner().invoke(
        get_app(), ["batch", "p.jsonl", "-o", "out", "-m", "walk", "--tile", "--seed", "5", "--image", "ref.png"]
    )
    assert result.exit_code == 0, result.output
    a, b = read_metadata("out/a.png"), read_metadata("out/b.png")
    assert (a["tile"], a["seed"], a["images"]) == (True, 5, ["ref.png"])
    assert (b["tile"], b["seed"]) == (False, 9)  # the row's own values win over the flags
    bad = CliRunner().invoke(get_app(), ["batch", "p.jsonl", "-o", "out2", "-m", "walk", "--steps", "0"])
    assert bad.exit_code == 1 and "--steps must be >= 1, got 0." in bad.output
