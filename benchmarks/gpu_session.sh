#!/usr/bin/env bash
# Issues 22, 23 and 25 on the GPU machine, one part after another; JSON lines under $OUT, then one GOAL line per goal.
#
#   bash benchmarks/gpu_session.sh [PART ...]     # PARTS: tests quant vae throughput cold (default: all, in order);
#   also vae-sweep profile kv lora cache decoder controlnet, and on two GPUs distributed ray
#
# Needs the wheels installed (/tmp/site: see /work/shared/gpu/install.sh; pytest among them for `tests`). imagegen
# need not be installed: the source tree and its plugins go on PYTHONPATH. Each part has a time limit (seconds,
# LIMIT_<part> overrides) and fails alone. Rough times on an H200: tests 60 s (300 s on a fresh machine), quant 400 s (Klein 4B 8/4-bit/nvfp4/fp8
# then Z-Image 8/4-bit/fp8, each end to end vs bf16), vae 60 s, throughput 60 s (reuses quant's Klein 4B checkpoint),
# cold 300 s (writes a 35 GB Klein 9B checkpoint). Other helpers' benchmarks can be added as parts below.
# TINY=1 runs every part on tiny CPU configs (checks this script; the numbers mean nothing).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-/tmp/imagegen-gpu}
WORK=${WORK:-/tmp/imagegen-bench}
mkdir -p "$OUT" "$WORK"
export PYTHONPATH="${PYTHONPATH:-/tmp/site}:$ROOT:$ROOT/plugins/imagegen-flux2:$ROOT/plugins/imagegen-zimage"
export IMAGEGEN_KERNEL_CACHE="${IMAGEGEN_KERNEL_CACHE:-$WORK/kernels}"
# A machine without a C++ compiler or nanobind cannot build the FP8 GEMM extension on first use: FP8_EXTENSION names
# one built elsewhere for the same MLX and Python (python imagegen/nn/fp8_extension.py --out DIR), put in the cache.
if [ -n "${FP8_EXTENSION:-}" ]; then
  mkdir -p "$IMAGEGEN_KERNEL_CACHE/imagegen" && cp "$FP8_EXTENSION" "$IMAGEGEN_KERNEL_CACHE/imagegen/"
fi
PY=${PYTHON:-python3}
T=()  # TINY=1: every benchmark on its tiny CPU config (a smoke run of this script without a GPU)
[ -n "${TINY:-}" ] && T=(--tiny)
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(tests quant vae throughput cold)

limit() { local var="LIMIT_$1"; echo "${!var:-$2}"; }

# run NAME LIMIT CMD...: the command's output in $OUT/NAME.log, its end marked in the console
run() {
  local name=$1 seconds=$2; shift 2
  local start=$SECONDS
  echo "== $name (limit ${seconds}s): $*"
  timeout --kill-after=10 "$seconds" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - start))s"
  grep -h '"error"' "$OUT/$name.log" | cut -c1-400 | head -5
  return 0
}

for part in "${parts[@]}"; do
  case $part in
    tests)
      if $PY -c "import pytest" 2>/dev/null; then
        # only the files that hold GPU tests: collecting the whole suite (torch, diffusers imports) takes minutes
        mapfile -t files < <(grep -rl "mark.cuda" tests plugins --include="test_*.py")
        # on a fresh machine MLX compiles its quantized-matmul kernels for each mode first (minutes, then cached)
        run tests "$(limit tests 420)" $PY -m pytest -m cuda -q -p no:cacheprovider --continue-on-collection-errors \
          --junitxml "$OUT/cuda-tests.xml" "${files[@]}"
        tail -3 "$OUT/tests.log"
      else
        echo "== tests: pytest is not installed here (add pytest, iniconfig, pluggy, packaging to the wheels)"
      fi ;;
    quant)
      run quant-matmul "$(limit quant_matmul 120)" $PY benchmarks/bench_quant.py --sections dequantize,matmul,fp8 \
        --out "$OUT/quant-matmul.jsonl" "${T[@]}"
      run klein4b-quant "$(limit klein4b 270)" $PY benchmarks/bench_generate.py --models flux2-klein-4b \
        --sections e2e,quant --impls imagegen --quant-modes 8,4,nvfp4,fp8 --pace "" --keep --workdir "$WORK" \
        --budget-s 250 --out "$OUT/klein4b-quant.jsonl" "${T[@]}"
      run zimage-quant "$(limit zimage 330)" $PY benchmarks/bench_generate.py --models zimage-turbo \
        --sections e2e,quant --impls imagegen --quant-modes 8,4,fp8 --pace "" --workdir "$WORK" \
        --budget-s 310 --out "$OUT/zimage-quant.jsonl" "${T[@]}"
      # a full-size step only (profile_step has no tiny mode)
      [ -z "${TINY:-}" ] && run profile-fp8 "$(limit profile_fp8 200)" $PY benchmarks/profile_step.py flux2-klein-4b \
        --quantize fp8 --no-kernels ;;
    vae)
      run vae "$(limit vae 150)" $PY benchmarks/bench_vae.py --workdir "$WORK" --out "$OUT/vae.jsonl" "${T[@]}" ;;
    throughput)
      run throughput "$(limit throughput 150)" $PY benchmarks/bench_throughput.py --workdir "$WORK" --reuse \
        --out "$OUT/throughput.jsonl" "${T[@]}" ;;
    cold)
      run cold "$(limit cold 420)" $PY benchmarks/bench_cold.py --workdir "$WORK" --out "$OUT/cold.jsonl" "${T[@]}" ;;
    kv)  # issue 23: Klein 9B-KV vs plain 9B editing vs diffusers' KV pipeline (writes a 35 GB checkpoint)
      run kv "$(limit kv 360)" $PY benchmarks/bench_kv.py --work "$WORK/kv" --out "$OUT/kv.jsonl" "${T[@]}"
      rm -rf "$WORK/kv" ;;
    lora)  # issue 20: one rank-32 LoRA's cost per step (bf16, 8-bit) and the time to switch adapters
      run lora "$(limit lora 240)" $PY benchmarks/bench_lora.py --out "$OUT/lora.jsonl" "${T[@]}" ;;
    cache)  # issue 23: step caching at 50 steps, Klein base 4B (speed-up, PSNR/SSIM vs uncached)
      run cache "$(limit cache 300)" $PY benchmarks/bench_cache.py --models flux2-klein-base-4b --sections cache \
        --out "$OUT/cache.jsonl" "${T[@]}" ;;
    decoder)  # issue 23: the standard and BFL's small FLUX.2 decoder at 1024 px, imagegen and diffusers
      run decoder "$(limit decoder 150)" $PY benchmarks/bench_cache.py --sections decode \
        --out "$OUT/decoder.jsonl" "${T[@]/--tiny/--quick}" ;;
    profile)  # issue 22: where Klein 4B's end to end goes, stage by stage: wall clock against GPU kernel time
      run profile-e2e "$(limit profile_e2e 220)" $PY benchmarks/bench_generate.py --models flux2-klein-4b \
        --sections e2e --impls imagegen --keep --workdir "$WORK" --out "$OUT/profile-e2e.jsonl" "${T[@]}"
      size=1024
      [ -n "${TINY:-}" ] && size=64
      run profile "$(limit profile 200)" $PY benchmarks/profile_pipeline.py "$WORK/flux2-klein-4b" --size $size \
        --out "$OUT/profile.jsonl" ;;
    vae-sweep)  # issue 22: every layer pacing x conv-strip size at 1024 px (which meets 30 ms within diffusers' memory)
      sizes=1024
      [ -n "${TINY:-}" ] && sizes=32  # a 1024 px decode takes minutes on the CPU
      run vae-sweep "$(limit vae_sweep 150)" $PY benchmarks/bench_vae.py --sizes $sizes --sweep --workdir "$WORK" \
        --out "$OUT/vae-sweep.jsonl" "${T[@]}" ;;
    controlnet)  # issue 23: a Z-Image step with vs without a ControlNet (Union 2.1 layout), imagegen vs diffusers
      run controlnet "$(limit controlnet 240)" $PY benchmarks/bench_controlnet.py --layouts 2.1 \
        --out "$OUT/controlnet.jsonl" "${T[@]}" ;;
    distributed)  # issue 25, two GPUs: the sharded transformer and split VAE decode over NCCL, then 1 vs 2 GPUs
      export NCCL_NVLS_ENABLE=0
      run distributed-tests "$(limit distributed_tests 120)" $PY -m pytest -q -p no:cacheprovider \
        tests/test_distributed.py -k "vae or transformer_sharded"
      tail -3 "$OUT/distributed-tests.log"
      run multi-gpu "$(limit multi_gpu 300)" $PY benchmarks/bench_multi_gpu.py --models flux2-klein-4b \
        --sizes 2048,1024 --sections generate,serve --work "$WORK/multi" --out "$OUT/multi-gpu.jsonl" "${T[@]}" ;;
    ray)  # issue 25, two GPUs: batch workers and Serve replicas, 1 vs 2 (48 images each)
      export NCCL_NVLS_ENABLE=0
      run ray "$(limit ray 300)" $PY benchmarks/bench_ray.py --sections scaling --scale 1,2 --images 48 \
        --work "$WORK/ray" --out "$OUT/ray.jsonl" "${T[@]}" ;;
    *)
      echo "unknown part '$part' (parts: tests quant vae vae-sweep profile throughput cold kv lora cache decoder controlnet" \
        "distributed ray)" >&2 ;;
  esac
done

junit=()
[ -f "$OUT/cuda-tests.xml" ] && junit=(--junit "$OUT/cuda-tests.xml")
$PY benchmarks/goals.py "$OUT"/*.jsonl "${junit[@]}" --out "$OUT/goals.jsonl"
