"""Where a host-bound BERT-128 forward spends its host time, eager against ``optimize``'s rewrite, piece by piece.

For layer 0 of BERT-base (seq 128, bf16, inference, CUDA) and for the whole model, the host time to
issue each piece (``attnkit.bench.host_ms``: after a synchronize, so no piece waits for an earlier one;
median of ``--calls``, the minimum over ``--rounds`` rounds in which eager and rewrite take turns):

* ``projections``: the Q, K and V ``nn.Linear`` calls (rewrite: the three fused members, one GEMM);
* ``attention fn``: transformers' ``sdpa_attention_forward`` against attnkit's interface function
  (the rewrite's inputs are views of the fused projection);
* ``attention op``: ``F.scaled_dot_product_attention`` against ``attnkit.ops.attention`` (auto) and the
  ATen op auto runs, on the same tensors;
* ``self-attention``, ``layer`` and ``forward``: the module, the whole layer and the whole model.

Each piece is timed at batch 1 and at ``--batch`` (auto's kernel differs between the two).

    PYTHONPATH=src taskset -c 3 python benchmarks/optimize/layer_host_pieces.py --label now --out $OUT/pieces-now.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from attnkit.bench import host_ms
from attnkit.models import build_model
from attnkit.optimize import OptimizeConfig, optimize
from attnkit.optimize.fuse import FusedLinear
from attnkit.optimize.hf_interface import attnkit_attention_forward
from attnkit.ops import attention
from attnkit.ops.calls import CALLS


def pieces(eager: torch.nn.Module, rewrite: torch.nn.Module, inputs: tuple, kwargs: dict) -> dict:
    """``{piece: {"eager": fn, "rewrite": fn}}`` at these inputs."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    layer_e, layer_r = eager.encoder.layer[0], rewrite.encoder.layer[0]
    self_e, self_r = layer_e.attention.self, layer_r.attention.self
    groups = [m for m in rewrite.modules() if isinstance(m, FusedLinear)]
    hidden = eager.embeddings(inputs[0])
    batch, seq = hidden.shape[:2]
    heads, dim = self_e.num_attention_heads, self_e.attention_head_size
    split = lambda t: t.view(batch, seq, heads, dim).transpose(1, 2)  # noqa: E731
    q_e, k_e, v_e = (split(p(hidden)) for p in (self_e.query, self_e.key, self_e.value))
    q_r, k_r, v_r = (split(p(hidden)) for p in (self_r.query, self_r.key, self_r.value))
    for group in groups:
        group.reset()
    scale = dim**-0.5

    def reset_after(fn):
        def run():
            out = fn()
            for group in groups:
                group.reset()
            return out

        return run

    attention(q_r, k_r, v_r, scale=scale)
    known = next(reversed(CALLS.values()))  # the call just made: auto's pick and its plan
    return {
        "projections": {
            "eager": lambda: (self_e.query(hidden), self_e.key(hidden), self_e.value(hidden)),
            "rewrite": reset_after(lambda: (self_r.query(hidden), self_r.key(hidden), self_r.value(hidden))),
        },
        "attention fn": {
            "eager": lambda: sdpa_attention_forward(self_e, q_e, k_e, v_e, None, dropout=0.0, scaling=scale, is_causal=False),
            "rewrite": lambda: attnkit_attention_forward(self_r, q_r, k_r, v_r, None, dropout=0.0, scaling=scale, is_causal=False),
        },
        "attention op": {
            "eager": lambda: F.scaled_dot_product_attention(q_r, k_r, v_r, scale=scale),
            "rewrite": lambda: attention(q_r, k_r, v_r, scale=scale),
            f"auto's plan ({known.backend})": lambda: known.run(q_r, k_r, v_r, known.options),
        },
        "self-attention": {"eager": lambda: self_e(hidden), "rewrite": reset_after(lambda: self_r(hidden))},
        "layer": {"eager": lambda: layer_e(hidden), "rewrite": reset_after(lambda: layer_r(hidden))},
        "forward": {"eager": lambda: eager(*inputs, **kwargs), "rewrite": lambda: rewrite(*inputs, **kwargs)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True, help="the attnkit tree measured")
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device: it measures the host cost of issuing CUDA work")
    zoo = build_model("bert-base", batch_size=args.batch, seq_len=128, dtype=torch.bfloat16, device="cuda")
    model, inputs, kwargs = zoo.model.eval(), zoo.example_inputs, zoo.example_kwargs
    first = lambda value, n: value[:n] if isinstance(value, torch.Tensor) else value  # noqa: E731
    config = OptimizeConfig(dtype=torch.bfloat16, check=False, measure=False)
    rewrite, _ = optimize(
        model, tuple(first(x, 1) for x in inputs), example_kwargs={k: first(v, 1) for k, v in kwargs.items()}, config=config
    )
    record = {"label": args.label, "device": torch.cuda.get_device_name(), "torch": torch.__version__, "command": "python " + " ".join(sys.argv),
              "unit": "µs of host time per call (min over rounds of the median of --calls)", "results": {}}  # fmt: skip
    with torch.inference_mode():
        for batch in (1, args.batch):
            ins, kws = tuple(first(x, batch) for x in inputs), {k: first(v, batch) for k, v in kwargs.items()}
            table = pieces(model, rewrite, ins, kws)
            best = {piece: {name: float("inf") for name in fns} for piece, fns in table.items()}
            for r in range(args.rounds):
                for piece, fns in table.items():
                    for name in list(fns) if r % 2 == 0 else list(fns)[::-1]:
                        for _ in range(3):
                            fns[name]()
                        best[piece][name] = min(best[piece][name], host_ms(fns[name], repeats=args.calls) * 1e3)
            record["results"][f"batch {batch}"] = {p: {n: round(t, 2) for n, t in row.items()} for p, row in best.items()}
            print(f"[{args.label}] batch {batch}:", json.dumps(record["results"][f"batch {batch}"]), flush=True)
    args.out.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
