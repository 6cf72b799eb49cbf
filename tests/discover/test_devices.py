"""Analysis code never mixes devices: a model on CUDA (or meta) is analysed without CPU tensors meeting it.

The H100 run failed on BERT and GPT-2 with "Expected all tensors to be on the same device": the
mask analysis built a CPU causal pattern and combined it with mask values evaluated on cuda:0.
Without a second device on the CPU runners, two checks stand in: every tensor factory in the
analysis code names its device, and ``mask_values.evaluate`` hands the mask analysis CPU tensors.
"""

import ast
from pathlib import Path

import pytest
import torch

import attnkit.analyze
import attnkit.discover
from attnkit.discover import attention, mask_values
from attnkit.discover.capture import capture

_FACTORIES = {"ones", "zeros", "full", "empty", "arange", "tensor", "rand", "randn", "randint", "eye", "linspace",
              "empty_strided", "ones_like", "zeros_like"}


def _factory_calls_without_device(path: Path) -> list[str]:
    """``torch.ones(...)``-style calls with neither ``device=`` nor ``**options`` (which may hold it)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in _FACTORIES
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
                and not node.func.attr.endswith("_like") and not any(k.arg in ("device", None) for k in node.keywords)):
            found.append(f"{path.name}:{node.lineno} torch.{node.func.attr}")
    return found


def test_every_tensor_factory_in_the_analysis_names_its_device():
    packages = [Path(package.__file__).parent for package in (attnkit.discover, attnkit.analyze)]
    paths = [path for package in packages for path in sorted(package.glob("*.py"))]
    assert len(paths) > 10  # both folders were read
    missing = [hit for path in paths for hit in _factory_calls_without_device(path)]
    assert not missing, f"tensor factories without device= (CPU tensors meet CUDA ones): {missing}"


def test_mask_values_reach_the_analysis_on_the_cpu():
    transformers = pytest.importorskip("transformers")
    model = transformers.GPT2Model(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=64)).eval()
    kwargs = {"input_ids": torch.randint(0, 64, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long),
              "use_cache": False}
    captured = capture(model, (), kwargs)
    cores = [attention._sdpa_core(n) for n in captured.graph_module.graph.nodes if attention.op_name(n) in attention.SDPA_OPS]
    values = mask_values.evaluate(captured, [mask for core in cores for mask, _ in core.masks])
    assert values and all(v.device.type == "cpu" and not v.requires_grad for v in values.values())
