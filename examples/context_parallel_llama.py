"""Train a tiny Llama for a few steps with its sequence split over the ranks, and check the loss
equals the one-process loss at every step.

    torchrun --nproc-per-node 2 examples/context_parallel_llama.py                    # CPU, gloo
    torchrun --nproc-per-node 2 examples/context_parallel_llama.py --device cuda      # GPUs, NCCL
    torchrun --nproc-per-node 4 examples/context_parallel_llama.py --seq 4096 --dtype float64

Every rank holds the whole model (random weights from a config, the same seed everywhere) and its
shard of each sequence (``shard_lm_batch``: zigzag token ids, global position ids, labels shifted
before sharding). Inside ``context_parallel`` the attention runs the ring; the ranks' losses sum to
the global mean and the parameter gradients are summed over the group (what DDP/FSDP over the same
ranks would do). A second copy of the model trains on the whole sequence on each rank as the
one-process reference.
"""

from __future__ import annotations

import argparse
import copy
import os

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

from attnkit.parallel import context_parallel, shard_lm_batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    parser.add_argument("--seq", type=int, default=256, help="global tokens per sequence (a multiple of 2 x ranks)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--method", default="ring", choices=["ring", "allgather", "ulysses"])
    args = parser.parse_args()

    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = torch.device(args.device, int(os.environ.get("LOCAL_RANK", 0))) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = getattr(torch, args.dtype)

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=max(args.seq, 64), attn_implementation="sdpa",
    )  # fmt: skip
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    reference = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.5)
    generator = torch.Generator().manual_seed(1)
    # transformers takes the loss in float32 (logits.float()), so float64 models agree to float32 rounding.
    tolerance = {torch.float64: 1e-6, torch.float32: 1e-4, torch.bfloat16: 3e-2}[dtype]

    for step in range(args.steps):
        input_ids = torch.randint(0, config.vocab_size, (2, args.seq), generator=generator).to(device)
        with context_parallel(model, layout="zigzag", method=args.method):
            loss = model(**shard_lm_batch(input_ids, input_ids)).loss  # this rank's share of the global mean
            loss.backward()
        for parameter in model.parameters():
            dist.all_reduce(parameter.grad)
        optimizer.step()
        optimizer.zero_grad()
        dist.all_reduce(loss := loss.detach())

        expected = reference(input_ids=input_ids, labels=input_ids, use_cache=False).loss
        expected.backward()
        reference_optimizer.step()
        reference_optimizer.zero_grad()
        difference = abs(loss.item() - expected.item()) / abs(expected.item())
        if rank == 0:
            print(f"step {step}: context-parallel loss {loss.item():.6f}  one-process loss {expected.item():.6f}  relative difference {difference:.1e}")
        assert difference <= tolerance, f"step {step}: loss differs by {difference:.1e} > {tolerance:.0e}"
    if rank == 0:
        print(f"OK: {world_size} ranks x {args.seq // world_size} tokens, {args.method}, {args.dtype}, {args.steps} steps match one process")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
