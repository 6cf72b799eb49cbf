#!/usr/bin/env bash
# The optimize grid on the GPUs of one host (4, or 2 with the ViT-L cells left out), one process per GPU, results tarred under $OUT.
#   bash benchmarks/on_one_host.sh
# Every cell's variants run on one GPU in one process (their ratios never cross GPUs); the ViT
# cells also race torch.compile's max-autotune (the peer the issue names), whose autotuning takes
# minutes, so each ViT has a GPU to itself. Inductor's compile workers are capped so the four
# processes leave the host's cores to the timed launches. Join the files afterwards with
#   python benchmarks/optimize/run.py --merge <the four JSON files> --out benchmarks/results/optimize
set -u
R=/tmp/results; mkdir -p "$R"
export PYTHONPATH=${PYTHONPATH:-src} PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=${COMPILE_THREADS:-8}
nvidia-smi --query-gpu=index,name,memory.total --format=csv > "$R/gpus.csv"
OPT="python3 benchmarks/optimize/run.py --out $R --budget-s ${OPT_BUDGET:-400} --modes-b1 default,reduce-overhead --modes-train default"
LIMIT=${JOB_LIMIT:-540}
VIT="--modes-b64 default,reduce-overhead,max-autotune"
TEXT="--modes-b64 default,reduce-overhead"
if [ "$(nvidia-smi -L | wc -l)" -ge 4 ]; then
  CUDA_VISIBLE_DEVICES=0 timeout $LIMIT $OPT --models vit_b_16 $VIT > "$R/optimize-gpu0.log" 2>&1 &
  CUDA_VISIBLE_DEVICES=1 timeout $LIMIT $OPT --models vit_l_16 $VIT > "$R/optimize-gpu1.log" 2>&1 &
  CUDA_VISIBLE_DEVICES=2 timeout $LIMIT $OPT --models gpt2-1024,llama-gqa-1024 $TEXT > "$R/optimize-gpu2.log" 2>&1 &
  CUDA_VISIBLE_DEVICES=3 timeout $LIMIT $OPT --models bert-base-128,bert-base-512 $TEXT > "$R/optimize-gpu3.log" 2>&1 &
else  # two GPUs: ViT-B/16 (the headline) on one, the text models' batch-64 cells first on the other
  CUDA_VISIBLE_DEVICES=0 timeout $LIMIT $OPT --models vit_b_16 $VIT > "$R/optimize-gpu0.log" 2>&1 &
  CUDA_VISIBLE_DEVICES=1 timeout $LIMIT $OPT --models bert-base-512,llama-gqa-1024,gpt2-1024,bert-base-128 $TEXT > "$R/optimize-gpu1.log" 2>&1 &
fi
wait
ls -la "$R"
tar czf "$OUT/results.tgz" -C "$R" .
