#!/usr/bin/env bash
# GPU check in one command, for a machine with a GPU, CUDA (nvcc), CMake, a C++ compiler and
# Python, but maybe no Node.js, no node_modules and no network:
#   1. finds Node: `node` on PATH (>= 20), else unpacks .node/node-v20-linux-x64.xz
#   2. finds node_modules, else unpacks .node/node_modules.tar.xz
#      (both made here by scripts/pack-node-for-device.sh; xz, else Python's lzma, unpacks)
#   3. builds the addon with CUDA (cmake-js from node_modules; plain cmake when only the
#      node-addon-api / node-api-headers packages are there)
#   4. prints `mlora info`, runs the CUDA kernel tests (test/cuda/kernels.test.ts: every CUDA
#      kernel vs the CPU one) and the GPU benchmark when `mlora bench --scenario gpu` exists
#   5. prints a short table last.
# The compiled TypeScript (dist/) must come along: build it where Node is (npm run build:ts).
# The lead runs it as: run(command: "bash scripts/device-check.sh", carry: [".node", "dist"]);
# the carry limit is 64 MiB for everything (node ≈ 24 MB xz, node_modules ≈ see docs/cuda.md).
# Logs and the table are also written to $OUT (when set) or .device-check/.
# Exit status: 0 when the build and the tests passed, 1 otherwise. Every missing thing is named.
set -u
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
out=${OUT:-$root/.device-check}
mkdir -p "$out"
log=$out/device-check.log
: > "$log"
rows=()      # "name|status|detail" for the table
missing=()
row() { rows+=("$1|$2|$3"); }
say() { echo "device-check: $*" | tee -a "$log"; }
fail_fast() {
  say "STOP: $*"
  row "stopped" "FAIL" "$*"
  print_table
  exit 1
}
print_table() {
  {
    echo
    echo "==================== mlora device check ($(date -u +%Y-%m-%dT%H:%MZ)) ===================="
    printf '%-44s %-6s %s\n' "check" "status" "detail"
    for r in "${rows[@]}"; do
      IFS='|' read -r a b c <<< "$r"
      printf '%-44s %-6s %s\n' "${a:0:44}" "$b" "$c"
    done
    if [ ${#missing[@]} -gt 0 ]; then echo "missing: ${missing[*]}"; fi
  } | tee "$out/table.txt"
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
if command -v nvidia-smi >/dev/null; then
  gpu=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)
  row "gpu" "ok" "${gpu:-nvidia-smi gave no GPU}"
else
  row "gpu" "?" "nvidia-smi not found"
fi
say "GPU: ${gpu:-unknown}"

# ---- 1. Node
node=""
if command -v node >/dev/null && node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 20 ? 0 : 1)'; then
  node=$(command -v node)
elif [ -f .node/node-v20-linux-x64.xz ]; then
  mkdir -p .node/bin
  if [ ! -x .node/bin/node ]; then
    unxz_to .node/node-v20-linux-x64.xz .node/bin/node.tmp || fail_fast "cannot unpack .node/node-v20-linux-x64.xz: neither xz nor python3 is installed"
    chmod +x .node/bin/node.tmp && mv .node/bin/node.tmp .node/bin/node
  fi
  node=$root/.node/bin/node
else
  missing+=("node>=20")
  fail_fast "no Node.js >= 20 on PATH and no .node/node-v20-linux-x64.xz (make it with scripts/pack-node-for-device.sh and carry .node)"
fi
"$node" --version >/dev/null 2>&1 || fail_fast "the Node binary $node does not run on this machine ($(uname -m), glibc $(ldd --version 2>/dev/null | head -1 | awk '{print $NF}'))"
export PATH=$(dirname "$node"):$PATH
row "node" "ok" "$("$node" --version) ($node)"

# ---- 2. node_modules
if [ ! -d node_modules ] || [ -L node_modules -a ! -e node_modules ]; then
  [ -L node_modules ] && rm -f node_modules
  if [ -f .node/node_modules.tar.xz ]; then
    say "unpacking .node/node_modules.tar.xz"
    untar_xz .node/node_modules.tar.xz node_modules || fail_fast "cannot unpack .node/node_modules.tar.xz: neither xz+tar nor python3 is installed"
  else
    missing+=("node_modules")
    fail_fast "no node_modules and no .node/node_modules.tar.xz (scripts/pack-node-for-device.sh makes it)"
  fi
fi
for m in node-addon-api node-api-headers cmake-js tap; do
  [ -d "node_modules/$m" ] || missing+=("node_modules/$m")
done
row "node_modules" "$([ ${#missing[@]} -eq 0 ] && echo ok || echo WARN)" "$(ls node_modules | wc -l) packages${missing[*]:+; missing ${missing[*]}}"

# ---- 3. the build
nvcc_bin=$(command -v nvcc || true)
for c in "${CUDA_HOME:-}" /usr/local/cuda /opt/cuda; do
  [ -z "$nvcc_bin" ] && [ -n "$c" ] && [ -x "$c/bin/nvcc" ] && nvcc_bin=$c/bin/nvcc
done
if [ -z "$nvcc_bin" ]; then
  missing+=("nvcc")
  row "nvcc" "FAIL" "not found (PATH, \$CUDA_HOME, /usr/local/cuda): the addon would build without CUDA"
else
  export PATH=$(dirname "$nvcc_bin"):$PATH
  row "nvcc" "ok" "$("$nvcc_bin" --version | grep -o 'release [0-9.]*' | head -1) ($nvcc_bin)"
fi
command -v cmake >/dev/null || { missing+=("cmake"); fail_fast "cmake is missing (>= 3.18 for CUDA)"; }
command -v c++ >/dev/null || command -v g++ >/dev/null || { missing+=("c++"); fail_fast "no C++ compiler (c++/g++)"; }
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
t0=$(date +%s)
if [ -d node_modules/cmake-js ] && [ -d node_modules/node-addon-api ]; then
  say "building the addon with cmake-js (${CMAKE_BUILD_PARALLEL_LEVEL} jobs)"
  "$node" scripts/build-native.mjs >> "$log" 2>&1
  rc=$?
elif [ -d node_modules/node-addon-api ] && [ -d node_modules/node-api-headers ]; then
  say "cmake-js is missing: building with cmake directly"
  inc="$root/node_modules/node-api-headers/include;$root/node_modules/node-addon-api"
  cmake -S native -B native/build -DCMAKE_BUILD_TYPE=Release "-DCMAKE_JS_INC=$inc" \
    "-DCMAKE_LIBRARY_OUTPUT_DIRECTORY=$root/native/build/Release" >> "$log" 2>&1 &&
    cmake --build native/build >> "$log" 2>&1
  rc=$?
else
  fail_fast "cannot build: node_modules/node-addon-api and node_modules/node-api-headers (or cmake-js) are missing"
fi
if [ $rc -ne 0 ]; then
  tail -40 "$log"
  row "build" "FAIL" "see $log"
  print_table
  exit 1
fi
row "build" "ok" "$(( $(date +%s) - t0 )) s; $(cat native/build/cuda.txt 2>/dev/null)"

# ---- 4. info, tests, bench
[ -f dist/scripts/mlora.js ] || fail_fast "dist/ is missing: run npm run build:ts where Node and typescript are, and carry dist"
"$node" dist/scripts/mlora.js info | tee -a "$log"
info_json=$("$node" dist/scripts/mlora.js info --json 2>>"$log")
ndev=$(echo "$info_json" | "$node" -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>{const i=JSON.parse(s);console.log(i.cuda.devices)})')
gemm=$(echo "$info_json" | "$node" -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>{const i=JSON.parse(s);console.log(i.cuda.gemm+" | "+(i.cuda.reason||""))})')
row "cuda devices" "$([ "${ndev:-0}" -gt 0 ] && echo ok || echo FAIL)" "${ndev:-?}"
row "gemm" "info" "$gemm"

tests_ok=1
if [ -d node_modules/tap ]; then
  say "running the CUDA kernel tests"
  "$node" scripts/run-tests.mjs test/cuda/kernels.test.ts > "$out/tests.tap" 2>&1
  trc=$?
  # Top-level subtests: "ok N - name # time=..", "not ok N - name", "ok N - name # SKIP why"
  while IFS= read -r line; do
    st=ok; [[ $line == not* ]] && st=FAIL
    name=${line#*- }
    detail=""
    if [[ $line == *"# SKIP"* ]]; then st=skip; detail=${line#*# SKIP}; fi
    row "${name%% # *}" "$st" "$detail"
  done < <(grep -E '^(not )?ok [0-9]+ - ' "$out/tests.tap")
  # the largest differences printed by the assertions (llm.c style)
  grep -E 'max \|diff\|' "$out/tests.tap" | sed -E 's/^ *(not )?ok [0-9]+ - //; s/ # .*//' > "$out/diffs.txt"
  summary=$(tail -1 "$out/tests.tap")
  [ $trc -eq 0 ] || tests_ok=0
  row "tests" "$([ $trc -eq 0 ] && echo ok || echo FAIL)" "$summary (details: $out/diffs.txt)"
  grep -E '^ *not ok' "$out/tests.tap" | head -20 | tee -a "$log"
else
  tests_ok=0
  row "tests" "FAIL" "node_modules/tap is missing"
fi

if [ -f dist/scripts/cli/bench.js ] && "$node" dist/scripts/mlora.js bench --help 2>&1 | grep -q -- 'gpu'; then
  say "running the GPU benchmark"
  if timeout "${MLORA_BENCH_TIMEOUT:-240}" "$node" dist/scripts/mlora.js bench --scenario gpu --json > "$out/bench.json" 2>> "$log"; then
    row "bench" "ok" "$(head -c 300 "$out/bench.json" | tr '\n' ' ')"
  else
    row "bench" "FAIL" "exit $? (see $log)"
  fi
else
  row "bench" "skip" "mlora bench --scenario gpu does not exist in this build yet"
fi

print_table
[ $tests_ok -eq 1 ] && exit 0 || exit 1
