#!/bin/sh
# Packs what scripts/device-check.sh needs on a GPU machine that has no Node.js and no network,
# into the ignored folder .node/ of this checkout:
#   .node/node-v20-linux-x64.xz    this machine's node binary, xz -9 (about 24 MB)
#   .node/node_modules.tar.xz      node_modules without what only the build here needs
#                                  (typescript, @typescript, @types): the device machine runs
#                                  the compiled dist/ and builds the addon with cmake-js.
#   .node/prebuilt/mlora.node      a CUDA build of the addon made here, when there is one
#                                  (native/build, or the cmake-js build folder given with
#                                  --prebuilt DIR, whose cuda.txt says `compiled`): the check
#                                  falls back to it if the build there fails.
# Then build dist/ here (npm run build:ts) and hand the device run
#   carry: [".node", "dist"]
# (the carry limit is 64 MiB for everything; `du -sh .node dist` says what this takes).
# Usage: scripts/pack-node-for-device.sh [--no-modules] [--prebuilt DIR]
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
mkdir -p .node
node_bin=$(command -v node) || { echo "pack-node-for-device: no node on PATH" >&2; exit 1; }
ver=$("$node_bin" -p 'process.versions.node')
case "$ver" in 20.*|22.*|24.*) ;; *) echo "pack-node-for-device: node $ver (want >= 20)" >&2; exit 1 ;; esac
command -v xz >/dev/null || { echo "pack-node-for-device: xz is missing (apt-get install xz-utils)" >&2; exit 1; }
echo "packing node $ver from $node_bin"
xz -9 -T0 -c "$node_bin" > .node/node-v20-linux-x64.xz.tmp
mv .node/node-v20-linux-x64.xz.tmp .node/node-v20-linux-x64.xz
echo "$ver" > .node/node-version.txt
modules=1
prebuilt=native/build
while [ $# -gt 0 ]; do
  case "$1" in
    --no-modules) modules=0 ;;
    --prebuilt) prebuilt=${2:?--prebuilt needs a folder}; shift ;;
    *) echo "pack-node-for-device: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
rm -rf .node/prebuilt
if grep -q '^compiled' "$prebuilt/cuda.txt" 2>/dev/null && [ -f "$prebuilt/Release/mlora.node" ]; then
  mkdir -p .node/prebuilt
  cp "$prebuilt/Release/mlora.node" "$prebuilt/cuda.txt" .node/prebuilt/
  echo "prebuilt CUDA addon: $(cat "$prebuilt/cuda.txt")"
else
  echo "no CUDA build in $prebuilt (its cuda.txt: $(cat "$prebuilt/cuda.txt" 2>/dev/null || echo none)): no prebuilt fallback packed"
fi
if [ $modules = 1 ]; then
  [ -d node_modules/ ] || { echo "pack-node-for-device: node_modules is missing (npm install first)" >&2; exit 1; }
  echo "packing node_modules (runtime + tap + cmake-js + node-addon-api)"
  # node_modules may be a symlink: the trailing slash makes tar read its contents.
  tar -C node_modules/ --exclude=./typescript --exclude=./@typescript --exclude=./@types \
      --exclude=./.cache -cf - . | xz -9 -T0 > .node/node_modules.tar.xz.tmp
  mv .node/node_modules.tar.xz.tmp .node/node_modules.tar.xz
fi
du -sh .node/* 2>/dev/null
[ -d dist ] && du -sh dist
echo "carry: [\".node\", \"dist\"]   (run npm run build:ts first if dist/ is missing)"
