#!/bin/bash
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=src
L=$OUT/run.log
mkdir -p $OUT/r
python -c "import torch, transformers, torchvision; print('torch', torch.__version__, 'transformers', transformers.__version__, 'torchvision', torchvision.__version__)" >> $L
echo "== cpu suite (-m 'not gpu') on torch 2.11 / transformers 5.17" >> $L
( timeout 260 python -m pytest -q -n 8 -m "not gpu" tests -p no:cacheprovider ) > $OUT/r/cpu-suite.log 2>&1; tail -4 $OUT/r/cpu-suite.log >> $L
echo "== gpu suite (-m gpu)" >> $L
( timeout 300 python -m pytest -q -m gpu tests -p no:cacheprovider ) > $OUT/r/gpu-suite.log 2>&1; tail -4 $OUT/r/gpu-suite.log >> $L
cat $L
