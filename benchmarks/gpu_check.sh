#!/usr/bin/env bash
# bash benchmarks/gpu_check.sh   (from the repository root, on a machine with one CUDA GPU)
# Issue 12's GPU check: plain vs guarded step time and peak memory in bf16 on a ~1B Llama built from its
# config (random weights, nothing downloaded), folded vs unmerged, full weights sharded vs unsharded, and the
# `secvec plan` estimate against the measured peak. Under 8 minutes on one A100/H100. Writes
# benchmarks/results/gpu-check.json; copy the table and verdicts into benchmarks/RESULTS.md with the date and GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
mkdir -p benchmarks/results
timeout 480 python benchmarks/gpu_check.py --out benchmarks/results/gpu-check.json "$@"
