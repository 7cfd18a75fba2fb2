#!/usr/bin/env python3
"""Writes DIR/model.safetensors for a model directory made by scripts/device/model-layout.ts.

    python3 scripts/device/make_weights.py DIR [--seed 0] [--device cuda]

Reads DIR/config.json (the dtype: torch_dtype or dtype) and DIR/tensors.json (name -> shape,
as mlora reads the model) and draws every tensor on the GPU: normal(0, 0.02), RMSNorm weights
1, stored in the config's dtype. For a 1.1B-parameter model this takes seconds on a GPU where
`mlora make-model` (seeded normal draws on one CPU core) takes minutes. No network is used.
"""
import argparse
import json
import os
import sys
import time

DTYPES = {"bfloat16": "bfloat16", "float32": "float32", "float16": "float16"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda", help="where to draw (cuda, else cpu)")
    a = ap.parse_args()
    cfg_file = os.path.join(a.dir, "config.json")
    shapes_file = os.path.join(a.dir, "tensors.json")
    for f in (cfg_file, shapes_file):
        if not os.path.isfile(f):
            print(f"make_weights: {f} is missing (make it with node dist/scripts/device/model-layout.js)", file=sys.stderr)
            return 2
    import torch
    from safetensors.torch import save_file

    with open(cfg_file) as fh:
        cfg = json.load(fh)
    with open(shapes_file) as fh:
        shapes = json.load(fh)
    name = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
    if name not in DTYPES:
        print(f"make_weights: {cfg_file}: torch_dtype must be one of {', '.join(DTYPES)}, got {name!r}", file=sys.stderr)
        return 2
    dtype = getattr(torch, DTYPES[name])
    dev = a.device if a.device == "cpu" or torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    gen = torch.Generator(device=dev).manual_seed(a.seed)
    tensors = {}
    total = 0
    for tname, shape in shapes.items():
        if not (isinstance(shape, list) and all(isinstance(x, int) and x > 0 for x in shape)):
            print(f"make_weights: {shapes_file}: {tname}: shape must be a list of positive integers, got {shape!r}", file=sys.stderr)
            return 2
        if tname.endswith("norm.weight"):
            t = torch.ones(shape, dtype=dtype)
        else:
            t = (torch.randn(shape, generator=gen, device=dev, dtype=torch.float32) * 0.02).to(dtype).cpu()
        tensors[tname] = t.contiguous()
        total += t.numel()
    out = os.path.join(a.dir, "model.safetensors")
    tmp = out + ".tmp"
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, out)
    print(f"make_weights: {len(tensors)} tensors, {total / 1e6:.1f}M parameters ({name}) drawn on {dev} and written to {out} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
