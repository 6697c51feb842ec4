"""The numpy torch generator against torch.randn itself: bit-exact for many seeds, shapes and both dtypes."""

import numpy as np
import pytest

from imagegen.torch_random import TorchGenerator, randn_tensor

torch = pytest.importorskip("torch")

SEEDS = [0, 1, 7, 42, 1234, 2**31 - 1, 2**32 + 5, 987654321]
# sizes below 16 (double Box-Muller, cached halves), exactly 16, ragged tails, latent-like shapes
SHAPES = [(1,), (2,), (3,), (15,), (16,), (17,), (31,), (33,), (2, 5, 7), (1, 4, 9, 11), (1, 16, 8, 8), (2, 128, 6, 10)]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_randn_matches_torch_bit_for_bit(seed, dtype):
    reference = torch.Generator("cpu").manual_seed(seed)
    ours = TorchGenerator(seed)
    # One generator through every shape in turn: the engine state and cached normals must carry over too.
    for shape in SHAPES:
        expected = torch.randn(shape, generator=reference, dtype=DTYPES[dtype]).float().numpy()
        got = ours.randn(shape, dtype)
        assert got.shape == expected.shape
        np.testing.assert_array_equal(got, expected, err_msg=f"seed {seed} shape {shape} {dtype}")


def test_large_latent_matches_torch():
    shape = (1, 128, 64, 64)  # Klein at 1024 px
    expected = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(3)).numpy()
    np.testing.assert_array_equal(TorchGenerator(3).randn(shape), expected)


def test_randn_tensor_follows_diffusers_generator_handling():
    from diffusers.utils.torch_utils import randn_tensor as diffusers_randn

    shape = (3, 16, 4, 5)
    one = diffusers_randn(shape, generator=torch.Generator("cpu").manual_seed(5), dtype=torch.float32).numpy()
    np.testing.assert_array_equal(randn_tensor(shape, TorchGenerator(5)), one)
    per_item = [torch.Generator("cpu").manual_seed(s) for s in (5, 6, 7)]
    many = diffusers_randn(shape, generator=per_item, dtype=torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(randn_tensor(shape, [TorchGenerator(s) for s in (5, 6, 7)], "bfloat16"), many)


def test_unsupported_dtype_is_refused():
    with pytest.raises(ValueError, match="float64"):
        TorchGenerator(0).randn((4,), "float64")
