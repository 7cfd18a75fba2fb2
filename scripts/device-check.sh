#!/usr/bin/env bash
# The GPU check in one command, for a machine with a GPU, CUDA (nvcc), CMake, a C++ compiler and
# Python with torch/transformers/peft, but maybe no Node.js, no node_modules and no network.
# docs/cuda.md says how to call it with the device tool. Steps, in order, each under its own
# `timeout` and all under one budget for the whole script (MLORA_DEVICE_CHECK_BUDGET_S, default
# 340 s), so one hang cannot eat the device time; a step that finds the budget spent is skipped:
#    node, node_modules  `node` on PATH (>= 20), else .node/node-v20-linux-x64.xz; node_modules,
#                        else .node/node_modules.tar.xz (both made by scripts/pack-node-for-device.sh)
#    build               the addon with CUDA (cmake-js; plain cmake with node-addon-api alone); if it
#                        fails and .node/prebuilt/mlora.node was carried, that one is used instead
#    info                mlora info: CUDA devices, the GEMM in use
#    kernels             test/cuda/kernels.test.ts: every kernel family vs the CPU, fwd+bwd, f32/bf16
#    model               test/cuda/model.test.ts: logits, losses, every LoRA gradient on cuda:0 vs
#                        float64 and vs the CPU model (llama + every family fixture; bf16 weights)
#    pipeline            test/cuda/pipeline.test.ts: 2 stage actors on cuda:0 vs 1 stage (bitwise), vs CPU
#    peft-adapter        mlora train (cuda:0) of a small model's adapter, then mlora's logits on cuda:0 and cpu:0
#    peft-check          scripts/device/peft_check.py: PEFT loads that adapter onto transformers'
#                        LlamaForCausalLM: same logits within the stated tolerance
#    bench-models        the bench (make-model) and 1b (layout by node, weights by make_weights.py) models, bf16
#    peft-baseline       scripts/device/peft_baseline.py: K adapters one after another, transformers + PEFT
#    bench               mlora bench --scenario gpu (joined with the baseline): tokens/s, MFU, vs PEFT
# and prints a table last. Files under $OUT (at most 8 come back): device-check.log (every step's
# output), table.txt, tests.tap, diffs.txt, peft-check.json, peft-baseline.json, bench-gpu.json.
# Without $OUT they go to .device-check/. Scratch (models, runs) goes to $MLORA_DEVICE_CHECK_WORK
# (default /tmp/mlora-device-check).
#
# Rehearsal on a machine without a GPU: MLORA_DEVICE_CHECK_REHEARSE=1 runs every step with cpu:0
# in place of cuda:0 (the CUDA tests compare the CPU with a cpu:1 stand-in, test/cuda/target.ts),
# at tiny sizes for the models and the benchmark, skips the build (the addon built here is used),
# and skips the Python steps with "skipped (rehearsal)" where torch is missing.
# Exit status: 0 when every step that ran passed, 1 otherwise.
set -u
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
out=${OUT:-$root/.device-check}
work=${MLORA_DEVICE_CHECK_WORK:-/tmp/mlora-device-check}
rehearse=${MLORA_DEVICE_CHECK_REHEARSE:-0}
budget=${MLORA_DEVICE_CHECK_BUDGET_S:-340}
export MLORA_DEVICE_CHECK_REHEARSE=$rehearse
mkdir -p "$out" "$work/logs"
export MLORA_CACHE=$work/cache
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
log=$out/device-check.log
: > "$log"
rm -f "$out/tests.tap" "$out/diffs.txt" "$out/peft-check.json" "$out/peft-baseline.json" "$out/bench-gpu.json"
t_start=$(date +%s)
rows=()      # "name|status|seconds|detail"
failed=0
row() { rows+=("$1|$2|$3|$4"); }
say() { echo "device-check: $*" | tee -a "$log"; }
print_table() {
  {
    echo
    echo "==================== mlora device check ($(date -u +%Y-%m-%dT%H:%MZ)$([ "$rehearse" = 1 ] && echo ', REHEARSAL on CPU')) ===================="
    printf '%-40s %-8s %5s  %s\n' "check" "status" "s" "detail"
    for r in "${rows[@]}"; do
      IFS='|' read -r a b c d <<< "$r"
      printf '%-40s %-8s %5s  %s\n' "${a:0:40}" "$b" "$c" "$d"
    done
    [ -f "$work/bench-table.txt" ] && { echo; cat "$work/bench-table.txt"; }
    echo
    echo "total $(( $(date +%s) - t_start )) s of the ${budget} s budget; files in $out"
  } | tee "$out/table.txt"
}
stop() {
  say "STOP: $*"
  row "stopped" "FAIL" "-" "$*"
  print_table
  exit 1
}
left() { echo $(( budget - ($(date +%s) - t_start) )); }

# step NAME LIMIT_S CMD...: CMD under timeout min(LIMIT_S, what is left of the budget); its output
# goes to $work/logs/NAME.log and into device-check.log. Sets step_rc (124: timed out; 99: skipped).
step() {
  local name=$1 limit=$2
  shift 2
  local l
  l=$(left)
  if [ "$l" -lt 15 ]; then
    row "$name" "skip" "-" "the ${budget} s budget is spent"
    step_rc=99
    return 0
  fi
  [ "$limit" -gt "$l" ] && limit=$l
  say "[$name] (limit ${limit} s) $*"
  local t0
  t0=$(date +%s)
  # timeout runs programs, not this script's functions: the child bash gets their definitions
  # and the variables they read
  local defs
  defs="$(declare -f); $(declare -p node root out work dev rehearse have_torch bench_models bench_args peft_args model_list 2>/dev/null)"
  timeout -k 10 "$limit" bash -c "$defs; \"\$@\"" "$name" "$@" > "$work/logs/$name.log" 2>&1
  step_rc=$?
  step_s=$(( $(date +%s) - t0 ))
  { echo "----- $name: exit $step_rc after ${step_s} s"; cat "$work/logs/$name.log"; } >> "$log"
  if [ $step_rc -eq 124 ] || [ $step_rc -eq 137 ]; then
    say "[$name] TIMED OUT after ${limit} s; its last lines:"
    tail -15 "$work/logs/$name.log" | tee -a "$log"
  elif [ $step_rc -ne 0 ]; then
    say "[$name] exit $step_rc; its last lines:"
    tail -25 "$work/logs/$name.log"
  fi
  return 0
}
# The row of a step from its rc: ok / FAIL / TIMEOUT, with a detail line.
step_row() {
  local name=$1 detail=$2
  case $step_rc in
    0) row "$name" "ok" "$step_s" "$detail" ;;
    99) ;;
    124|137) row "$name" "TIMEOUT" "$step_s" "$detail"; failed=1 ;;
    *) row "$name" "FAIL" "$step_s" "exit $step_rc; $detail"; failed=1 ;;
  esac
}

unxz_to() {  # unxz_to <file.xz> <dest>
  if command -v xz >/dev/null; then
    xz -dc "$1" > "$2"
  elif command -v python3 >/dev/null; then
    python3 -c 'import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],"wb"))' "$1" "$2"
  else
    return 1
  fi
}
untar_xz() {  # untar_xz <file.tar.xz> <dir>
  mkdir -p "$2"
  if command -v xz >/dev/null && tar --version >/dev/null 2>&1; then
    xz -dc "$1" | tar -C "$2" -xf -
  elif command -v python3 >/dev/null; then
    python3 -c 'import tarfile,sys; tarfile.open(sys.argv[1], "r:xz").extractall(sys.argv[2])' "$1" "$2"
  else
    return 1
  fi
}

# ---- the machine
if [ "$rehearse" = 1 ]; then
  dev=cpu:0
  row "gpu" "skip" "-" "skipped (rehearsal): cpu:0 stands in for cuda:0"
elif command -v nvidia-smi >/dev/null; then
  dev=cuda:0
  gpu=$(nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader 2>/dev/null | head -1)
  row "gpu" "ok" "-" "${gpu:-nvidia-smi gave no GPU}"
else
  dev=cuda:0
  row "gpu" "?" "-" "nvidia-smi not found"
fi
say "device $dev; budget ${budget} s; work $work; out $out"

# ---- Node and node_modules
node=""
if command -v node >/dev/null && node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 20 ? 0 : 1)'; then
  node=$(command -v node)
elif [ -f .node/node-v20-linux-x64.xz ]; then
  mkdir -p .node/bin
  if [ ! -x .node/bin/node ]; then
    unxz_to .node/node-v20-linux-x64.xz .node/bin/node.tmp || stop "cannot unpack .node/node-v20-linux-x64.xz: neither xz nor python3 is installed"
    chmod +x .node/bin/node.tmp && mv .node/bin/node.tmp .node/bin/node
  fi
  node=$root/.node/bin/node
else
  stop "no Node.js >= 20 on PATH and no .node/node-v20-linux-x64.xz (make it with scripts/pack-node-for-device.sh and carry .node)"
fi
"$node" --version >/dev/null 2>&1 || stop "the Node binary $node does not run on this machine ($(uname -m), glibc $(ldd --version 2>/dev/null | head -1 | awk '{print $NF}'))"
export PATH=$(dirname "$node"):$PATH
row "node" "ok" "-" "$("$node" --version) ($node)"

missing=()
if [ ! -d node_modules ] || [ -L node_modules -a ! -e node_modules ]; then
  [ -L node_modules ] && rm -f node_modules
  [ -f .node/node_modules.tar.xz ] || stop "no node_modules and no .node/node_modules.tar.xz (scripts/pack-node-for-device.sh makes it)"
  say "unpacking .node/node_modules.tar.xz"
  untar_xz .node/node_modules.tar.xz node_modules || stop "cannot unpack .node/node_modules.tar.xz: neither xz+tar nor python3 is installed"
fi
for m in node-addon-api node-api-headers cmake-js tap; do
  [ -d "node_modules/$m" ] || missing+=("node_modules/$m")
done
row "node_modules" "$([ ${#missing[@]} -eq 0 ] && echo ok || echo WARN)" "-" "$(ls node_modules | wc -l) packages${missing[*]:+; missing ${missing[*]}}"
[ -f dist/scripts/mlora.js ] || stop "dist/ is missing: run npm run build:ts where Node and typescript are, and carry dist"
mlora() { "$node" dist/scripts/mlora.js "$@"; }

# ---- the build
build_native() {
  if [ -d node_modules/cmake-js ] && [ -d node_modules/node-addon-api ]; then
    "$node" scripts/build-native.mjs
  elif [ -d node_modules/node-addon-api ] && [ -d node_modules/node-api-headers ]; then
    local inc="$root/node_modules/node-api-headers/include;$root/node_modules/node-addon-api"
    cmake -S native -B native/build -DCMAKE_BUILD_TYPE=Release "-DCMAKE_JS_INC=$inc" \
      "-DCMAKE_LIBRARY_OUTPUT_DIRECTORY=$root/native/build/Release" && cmake --build native/build
  else
    echo "cannot build: node_modules/node-addon-api and node_modules/node-api-headers (or cmake-js) are missing"
    return 1
  fi
}
if [ "$rehearse" = 1 ] && [ -f native/build/Release/mlora.node ]; then
  row "build" "skip" "-" "skipped (rehearsal): the addon built here ($(cat native/build/cuda.txt 2>/dev/null))"
else
  nvcc_bin=$(command -v nvcc || true)
  for c in "${CUDA_HOME:-}" /usr/local/cuda /opt/cuda; do
    [ -z "$nvcc_bin" ] && [ -n "$c" ] && [ -x "$c/bin/nvcc" ] && nvcc_bin=$c/bin/nvcc
  done
  if [ -n "$nvcc_bin" ]; then
    export PATH=$(dirname "$nvcc_bin"):$PATH
    row "nvcc" "ok" "-" "$("$nvcc_bin" --version | grep -o 'release [0-9.]*' | head -1) ($nvcc_bin)"
  else
    row "nvcc" "FAIL" "-" "not found (PATH, \$CUDA_HOME, /usr/local/cuda): the addon would build without CUDA"
  fi
  command -v cmake >/dev/null || row "cmake" "FAIL" "-" "cmake is missing (>= 3.18 for CUDA)"
  export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
  step build 180 build_native
  if [ $step_rc -eq 0 ] && grep -q '^compiled' native/build/cuda.txt 2>/dev/null; then
    step_row build "$(cat native/build/cuda.txt)"
  elif [ -f .node/prebuilt/mlora.node ]; then
    [ $step_rc -eq 0 ] && step_rc=1
    step_row build "no CUDA build here ($(cat native/build/cuda.txt 2>/dev/null || echo 'see the log')); using the carried .node/prebuilt/mlora.node ($(cat .node/prebuilt/cuda.txt 2>/dev/null))"
    export MLORA_ADDON=$root/.node/prebuilt/mlora.node
  else
    [ $step_rc -eq 0 ] && step_rc=1
    step_row build "$(cat native/build/cuda.txt 2>/dev/null || echo 'see device-check.log')"
    print_table
    exit 1
  fi
fi

# ---- cuBLAS: the addon searches the usual places; torch's pip wheels sit in a venv that
# $VIRTUAL_ENV may not name, so look there too
if [ -z "${MLORA_CUBLAS:-}" ] && [ "$rehearse" != 1 ]; then
  for d in /usr/local/cuda/lib64 $(timeout 30 python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null); do
    f=$(find "$d" -maxdepth 4 \( -name 'libcublas.so.13' -o -name 'libcublas.so.12' \) 2>/dev/null | head -1)
    if [ -n "$f" ]; then
      export MLORA_CUBLAS=$f
      break
    fi
  done
  row "cublas" "$([ -n "${MLORA_CUBLAS:-}" ] && echo ok || echo WARN)" "-" "${MLORA_CUBLAS:-not found: the fallback GEMM is used}"
fi

# ---- info
step info 30 mlora info
step_row info "$(grep -iE '^ *cuda' "$work/logs/info.log" | head -2 | tr -s ' ' | tr '\n' ' ')"
info_json=$(mlora info --json 2>>"$log")
ndev=$(echo "$info_json" | "$node" -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>{try{console.log(JSON.parse(s).cuda.devices)}catch{console.log(0)}})')
gemm=$(echo "$info_json" | "$node" -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>{try{const i=JSON.parse(s);console.log(i.cuda.gemm)}catch{console.log("?")}})')
if [ "$rehearse" = 1 ]; then
  row "cuda devices" "skip" "-" "skipped (rehearsal): ${ndev:-0} here"
else
  row "cuda devices" "$([ "${ndev:-0}" -gt 0 ] && echo ok || echo FAIL)" "-" "${ndev:-?}; gemm: $gemm"
  [ "${ndev:-0}" -gt 0 ] || failed=1
fi

# ---- the CUDA tests (TAP of all three into tests.tap; each top-level subtest becomes a row)
tap_rows() {  # tap_rows <log> : one row per top-level subtest of the file
  grep -E '^    (not )?ok [0-9]+ - ' "$1" | while IFS= read -r line; do
    st=ok; [[ $line == *"not ok"* ]] && st=FAIL
    name=${line#*- }
    detail=""
    if [[ $line == *"# SKIP"* ]]; then st=skip; detail=${line#*# SKIP}; fi
    echo "  ${name%% # *}|$st|-|$detail"
  done
}
for t in kernels model pipeline; do
  limit=90; [ $t = kernels ] || limit=60
  step "$t" $limit "$node" scripts/run-tests.mjs "test/cuda/$t.test.ts"
  cat "$work/logs/$t.log" >> "$out/tests.tap"
  step_row "$t" "$(tail -1 "$work/logs/$t.log")"
  while IFS= read -r r; do rows+=("$r"); done < <(tap_rows "$work/logs/$t.log")
done
grep -E 'max \|diff\||‖' "$out/tests.tap" | sed -E 's/^ *(not )?ok [0-9]+ - //; s/ # .*//' > "$out/diffs.txt"

# ---- PEFT loads mlora's adapter: same logits
have_torch=0
timeout 90 python3 -c 'import torch, transformers, peft, safetensors' >/dev/null 2>&1 && have_torch=1
peft_adapter() {
  set -e
  rm -rf "$work/peft"
  mkdir -p "$work/peft"
  mlora make-model --preset small --out "$work/peft/small"
  cat > "$work/peft/train.yaml" <<EOF
model: $work/peft/small
devices: [$dev]
output: $work/peft/run
log: { progress: plain, every: 5 }
adapters:
  - name: peftcheck
    data: $root/data/demo/arithmetic.jsonl
    lora: { r: 8, alpha: 16, dropout: 0, targets: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj] }
    optimizer: { lr: 5.0e-3 }
    batch_size: 4
    seq_len: 256
    max_steps: 10
    seed: 3
EOF
  mlora train "$work/peft/train.yaml"
  "$node" dist/scripts/device/logits.js --model "$work/peft/small" --adapter "$work/peft/run/peftcheck" \
    --devices "$dev,cpu:$([ "$dev" = cpu:0 ] && echo 1 || echo 0)" --out "$work/peft/mlora-logits.safetensors"
}
step peft-adapter 60 peft_adapter
step_row peft-adapter "small model, 10 steps on $dev: $(grep -oE 'overall: .*' "$work/logs/peft-adapter.log" | head -1)"
if [ $step_rc -eq 0 ]; then
  if [ $have_torch = 1 ]; then
    step peft-check 90 python3 -B scripts/device/peft_check.py --model "$work/peft/small" --adapter "$work/peft/run/peftcheck" \
      --logits "$work/peft/mlora-logits.safetensors" --out "$out/peft-check.json"
    step_row peft-check "$(grep -E 'vs PEFT float64' "$work/logs/peft-check.log" | sed 's/peft_check: //' | tr '\n' ';')"
  elif [ "$rehearse" = 1 ]; then
    row "peft-check" "skip" "-" "skipped (rehearsal): no torch/transformers/peft here"
  else
    row "peft-check" "FAIL" "-" "python3 cannot import torch, transformers, peft and safetensors"
    failed=1
  fi
fi

# ---- the benchmark models, the PEFT baseline, mlora's benchmark
if [ "$rehearse" = 1 ]; then
  bench_models=(tiny small)
  bench_args=(--device cpu:0 --adapters 1,4 --stages 1,2 --micro-batch 1 --seq-len 32 --steps 1 --ceiling-n 256)
  peft_args=(--adapters 1,4 --micro 1 --seq-len 32 --steps 1 --ceiling-n 256)
else
  bench_models=(bench 1b)
  bench_args=(--device "$dev" --adapters 1,4,8 --stages 1,2 --micro-batch 2 --seq-len 512 --steps 3 --ceiling-n 8192)
  peft_args=(--adapters 1,4,8 --micro 2 --seq-len 512 --steps 3 --ceiling-n 8192)
fi
make_bench_models() {
  set -e
  mkdir -p "$work/models"
  local m
  for m in "${bench_models[@]}"; do
    [ -f "$work/models/$m/model.safetensors" ] && continue
    if [ "$m" = 1b ] && [ $have_torch = 1 ]; then
      # make-model's one-core normal draws would take minutes for 1.1B parameters: Python draws them on the GPU
      "$node" dist/scripts/device/model-layout.js --preset 1b --out "$work/models/1b"
      python3 -B scripts/device/make_weights.py "$work/models/1b"
    else
      mlora make-model --preset "$m" --dtype bf16 --out "$work/models/$m"
    fi
  done
}
step bench-models 90 make_bench_models
step_row bench-models "$(printf '%s ' "${bench_models[@]}")in bf16 under $work/models"
models_ok=$step_rc
model_list=$(printf "$work/models/%s," "${bench_models[@]}")
if [ $models_ok -eq 0 ] && [ $have_torch = 1 ] && [ "$rehearse" != 1 ]; then
  peft_models=()
  for m in "${bench_models[@]}"; do peft_models+=(--model "$m=$work/models/$m"); done
  step peft-baseline 90 python3 -B scripts/device/peft_baseline.py "${peft_models[@]}" \
    "${peft_args[@]}" --out "$out/peft-baseline.json"
  step_row peft-baseline "$(grep -E 'K=[0-9]+:' "$work/logs/peft-baseline.log" | sed 's/peft_baseline: //' | cut -d, -f1 | tr '\n' ';')"
else
  row "peft-baseline" "skip" "-" "$([ "$rehearse" = 1 ] && echo 'skipped (rehearsal): needs torch on a GPU' || echo 'no models or no torch')"
fi
if [ $models_ok -eq 0 ]; then
  bench_run() { mlora bench --scenario gpu --models "${model_list%,}" "${bench_args[@]}" --baseline "$out/peft-baseline.json" --json > "$out/bench-gpu.json"; }
  step bench 150 bench_run
  # the table is the end of its progress output (stderr)
  sed -n '/^mlora bench --scenario gpu/,$p' "$work/logs/bench.log" > "$work/bench-table.txt"
  step_row bench "$(grep -E '^target ' "$work/logs/bench.log" | tr '\n' ';')"
fi

print_table
exit $failed
