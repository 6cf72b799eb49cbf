"""Every attnkit.ops backend that runs on this machine reproduces the golden fixtures
(float64 within 1e-6, float32 within 1e-5), and the fixtures are what scripts/golden.py generates."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from attnkit.errors import UnsupportedError
from attnkit.ops import BACKENDS

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("golden_script", ROOT / "scripts" / "golden.py")
golden = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)  # dataclasses look the module up
_spec.loader.exec_module(golden)

MANIFEST = json.loads(golden.MANIFEST.read_text())
DTYPES = {"float64": torch.float64, "float32": torch.float32}


# FlexAttention warns that it runs unfused without torch.compile; correctness is what is tested here.
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
@pytest.mark.parametrize("name", MANIFEST["cases"])
def test_backend_reproduces_fixture(name, backend, dtype):
    entry, case = MANIFEST["cases"][name], golden.CASES_BY_NAME[name]
    tensors = load_file(golden.GOLDEN_DIR / entry["file"])
    module = golden.build_module(case, tensors, backend, DTYPES[dtype])
    tol = entry["tolerance"][dtype]
    try:
        with torch.no_grad():
            # need_weights=False runs `backend`; the weights path always runs the explicit math.
            out, _ = golden.call_case(module, case, tensors, DTYPES[dtype], need_weights=False)
            if "expected.weights" in tensors:
                out_with_weights, weights = golden.call_case(module, case, tensors, DTYPES[dtype])
                torch.testing.assert_close(out_with_weights.double(), tensors["expected.out"], rtol=tol, atol=tol)
                torch.testing.assert_close(weights.double(), tensors["expected.weights"], rtol=tol, atol=tol)
    except UnsupportedError as error:  # the op's own verdict, e.g. a CUDA-only kernel or no dropout_mask
        pytest.skip(f"{backend} cannot run {name} here: {error}")
    assert out.dtype == DTYPES[dtype]
    torch.testing.assert_close(out.double(), tensors["expected.out"], rtol=tol, atol=tol)


def test_fixtures_are_small_and_current():
    size = sum(path.stat().st_size for path in golden.GOLDEN_DIR.glob("*"))
    assert size < 1_000_000, f"golden fixtures take {size} bytes; keep them under 1 MB"
    problems = golden.check()
    assert not problems, "\n".join(problems) + "\nRegenerate with `python scripts/golden.py` if the change is intended."
