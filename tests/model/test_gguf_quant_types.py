"""Every supported GGUF tensor type loads: real values → GGUF file → loader → within the type's error.

Files are written with `gguf.GGUFWriter` from values quantized by gguf's own quantizers
(F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) or by `tests.model.kquants` (the K-quants,
which gguf cannot quantize). The loader must (1) return exactly what gguf's dequantizer
makes of the stored bytes, so it adds no error, (2) land within each type's worst-case
error of the original values, and (3) honour the dtype it is asked for.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf import quants as gguf_quants

from pagedllm.model.loader.errors import ModelLoadError
from pagedllm.model.loader.gguf import load_gguf_tensors
from tests.model import kquants

T = GGMLQuantizationType
SHAPE = (8, 512)  # rows of whole 256-value super-blocks
NAME = "blk.0.ffn_up.weight"


def _blocks(x: np.ndarray, size: int) -> np.ndarray:
    return x.reshape(-1, size)


def _per_value(stat: np.ndarray, x: np.ndarray, size: int) -> np.ndarray:
    return np.broadcast_to(stat, _blocks(x, size).shape).reshape(x.shape)


def _absmax_tolerance(steps: int, steps_of_error: float):
    """Symmetric 32-value blocks, step d = absmax / steps, scale stored as float16.

    Besides the rounding error (in steps), the float16 scale is off by ≤ 2⁻¹¹·d and is
    multiplied by |q| ≤ steps, adding ≤ absmax·2⁻¹¹.
    """

    def tolerance(x: np.ndarray) -> np.ndarray:
        absmax = np.abs(_blocks(x, 32)).max(-1, keepdims=True)
        return _per_value(absmax * (steps_of_error / steps + 2**-11), x, 32)

    return tolerance


def _range_tolerance(steps: int):
    """Affine 32-value blocks, step d = (max − min) / steps, rounded to nearest (½ step).

    Float16 storage of d (times q ≤ steps) and of min add ≤ (range + |min|)·2⁻¹¹.
    """

    def tolerance(x: np.ndarray) -> np.ndarray:
        blocks = _blocks(x, 32)
        lo, hi = blocks.min(-1, keepdims=True), blocks.max(-1, keepdims=True)
        bound = 0.5 * (hi - lo) / steps + ((hi - lo) + np.abs(lo)) * 2**-11
        return _per_value(bound, x, 32)

    return tolerance


def _k_quant_tolerance(qtype: GGMLQuantizationType):
    return lambda x: kquants.error_bound(x, qtype)


# The worst-case |loaded − original| per value, derived in each helper's docstring.
TOLERANCE = {
    T.F32: lambda x: np.zeros_like(x),  # stored as is
    # round to nearest with 11 significant bits: ≤ 2⁻¹¹·|x|, plus half the subnormal spacing
    T.F16: lambda x: np.abs(x) * 2**-11 + 2**-25,
    T.BF16: lambda x: np.abs(x) * 2**-8,  # round to nearest even, 8 significant bits
    T.Q8_0: _absmax_tolerance(127, 0.5),  # q = round(x / d)
    # d = −(signed absmax)/8: the far side's top level is 7·|d|, so up to a whole step is clipped
    T.Q4_0: _absmax_tolerance(8, 1.0),
    T.Q5_0: _absmax_tolerance(16, 1.0),  # as Q4_0 with levels −16..15
    T.Q4_1: _range_tolerance(15),
    T.Q5_1: _range_tolerance(31),
    **{qtype: _k_quant_tolerance(qtype) for qtype in kquants.AFFINE | kquants.SYMMETRIC},
}


def quantize(values: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """What a GGUF file stores for `values`: a float array for F32/F16, else uint8 blocks."""
    if qtype in kquants.AFFINE or qtype in kquants.SYMMETRIC:
        return kquants.quantize(values, qtype)
    return gguf_quants.quantize(values, qtype)


def write_gguf(path: Path, tensors: dict[str, tuple[np.ndarray, GGMLQuantizationType]]) -> None:
    writer = GGUFWriter(path, arch="llama")
    for name, (stored, qtype) in tensors.items():
        if stored.dtype == np.uint8:
            # For bytes the writer derives the value shape from raw_dtype's block size.
            writer.add_tensor(name, stored, raw_dtype=qtype)
        else:
            writer.add_tensor(name, stored)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory):
    """One GGUF file per type: qtype → (path, original float32 values, stored array)."""
    root = tmp_path_factory.mktemp("quant_types")
    rng = np.random.default_rng(0)
    files = {}
    for qtype in TOLERANCE:
        values = rng.standard_normal(SHAPE).astype(np.float32)
        stored = quantize(values, qtype)
        path = root / f"{qtype.name}.gguf"
        write_gguf(path, {NAME: (stored, qtype)})
        files[qtype] = (path, values, stored)
    return files


@pytest.mark.parametrize("qtype", list(TOLERANCE), ids=lambda t: t.name)
def test_quant_type_loads_within_its_expected_error(written, qtype: GGMLQuantizationType) -> None:
    path, values, stored = written[qtype]

    loaded = load_gguf_tensors(path, torch.float32)[NAME]

    assert loaded.dtype == torch.float32
    assert tuple(loaded.shape) == SHAPE
    # the loader adds no error of its own to gguf's dequantization
    expected = torch.from_numpy(gguf_quants.dequantize(stored, qtype).reshape(SHAPE))
    assert torch.equal(loaded, expected)
    error = np.abs(loaded.numpy().astype(np.float64) - values)
    tolerance = TOLERANCE[qtype](values.astype(np.float64))
    worst = np.unravel_index(np.argmax(error - tolerance), SHAPE)
    assert np.all(error <= tolerance), (
        f"{qtype.name}: |error| {error[worst]:.3g} > tolerance {tolerance[worst]:.3g} at {worst}"
    )


@pytest.mark.parametrize("qtype", list(TOLERANCE), ids=lambda t: t.name)
def test_loader_honours_requested_dtype(written, qtype: GGMLQuantizationType) -> None:
    path, _, stored = written[qtype]

    loaded = load_gguf_tensors(path, torch.bfloat16)[NAME]

    assert loaded.dtype == torch.bfloat16
    expected = torch.from_numpy(gguf_quants.dequantize(stored, qtype).reshape(SHAPE))
    assert torch.equal(loaded, expected.to(torch.bfloat16))


def test_unsupported_type_error_names_file_tensor_and_type(tmp_path: Path) -> None:
    # Q8_K is ggml's dot-product scratch format: it has a block size but no dequantizer.
    path = tmp_path / "q8k.gguf"
    stored = np.zeros((1, 2 * 292), dtype=np.uint8)  # two Q8_K blocks of 256 values
    write_gguf(path, {NAME: (stored, T.Q8_K)})

    with pytest.raises(ModelLoadError) as caught:
        load_gguf_tensors(path, torch.float32)

    message = str(caught.value)
    assert str(path) in message
    assert NAME in message
    assert "Q8_K" in message
