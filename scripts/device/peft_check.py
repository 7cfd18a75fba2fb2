#!/usr/bin/env python3
"""mlora's adapter under PEFT: the same logits as mlora's, within a stated tolerance.

    python3 scripts/device/peft_check.py --model DIR --adapter DIR --logits FILE [--out JSON]

DIR is a model directory mlora made (`mlora make-model`, f32), the adapter one `mlora train`
wrote (PEFT layout), FILE what `node dist/scripts/device/logits.js` wrote: input_ids [S, T]
and mlora's logits_<device> [S, T, V] per device. Here transformers' LlamaForCausalLM loads the
model, PEFT's PeftModel loads the adapter onto it, and the logits of the same ids are computed
in float64 on the CPU (the reference) and in float32 on the GPU (information only: TF32 off).

Passes when, for every mlora device, max |mlora - peft64| / (ATOL + RTOL·|peft64|) <= 1 with
ATOL 5e-5, RTOL 5e-4 (float32 against float64 through the model's layers; mlora's CPU model
meets 2e-5 / 1e-4 on the tiny fixtures), and the adapter visibly matters: its effect on the
logits (||peft - base|| / ||peft||) is at least 100 times mlora's relative error, and every LoRA
module of the adapter was loaded with a lora_B that is not all zeros. No network is used.
"""
import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ATOL, RTOL = 5e-5, 5e-4


def dtype_kwargs(transformers, dtype):
    """transformers >= 4.56 names the argument `dtype`, older ones `torch_dtype`."""
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def load(model_dir, adapter_dir, dtype, device):
    import torch
    import transformers
    from peft import PeftModel

    base = transformers.LlamaForCausalLM.from_pretrained(
        model_dir, local_files_only=True, attn_implementation="eager", **dtype_kwargs(transformers, torch.float32)
    )
    model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=False)
    return model.to(device=device, dtype=dtype).eval()


def lora_modules(model):
    from peft.tuners.lora import LoraLayer

    mods = [m for _, m in model.named_modules() if isinstance(m, LoraLayer)]
    nonzero_b = sum(1 for m in mods if any(float(b.weight.abs().max()) > 0 for b in m.lora_B.values()))
    return len(mods), nonzero_b


def logits_of(model, ids):
    import torch

    with torch.no_grad():
        lg = model(input_ids=ids.to(model.device)).logits.double().cpu()
        with model.disable_adapter():
            base = model(input_ids=ids.to(model.device)).logits.double().cpu()
    return lg, base


def compare(got, ref):
    d = (got - ref).abs()
    ratio = (d / (ATOL + RTOL * ref.abs())).max().item()
    rel = ((got - ref).norm() / ref.norm()).item()
    return {"max_abs_diff": d.max().item(), "worst_ratio": ratio, "rel_norm_err": rel}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--logits", required=True)
    ap.add_argument("--out", help="JSON result file")
    a = ap.parse_args()
    for p in (os.path.join(a.model, "config.json"), os.path.join(a.adapter, "adapter_config.json"), a.logits):
        if not os.path.isfile(p):
            print(f"peft_check: {p} is missing", file=sys.stderr)
            return 2
    import torch
    import transformers
    import peft
    from safetensors.torch import load_file

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    f = load_file(a.logits)
    if "input_ids" not in f:
        print(f"peft_check: {a.logits} has no input_ids tensor", file=sys.stderr)
        return 2
    ids = f["input_ids"].long()
    mlora = {k[len("logits_"):].replace("_", ":"): v.double() for k, v in f.items() if k.startswith("logits_")}
    if not mlora:
        print(f"peft_check: {a.logits} has no logits_<device> tensor", file=sys.stderr)
        return 2

    ref_model = load(a.model, a.adapter, torch.float64, "cpu")
    n_lora, n_nonzero = lora_modules(ref_model)
    with open(os.path.join(a.adapter, "adapter_config.json")) as fh:
        acfg = json.load(fh)
    want_lora = ref_model.config.num_hidden_layers * len(acfg["target_modules"])
    ref, base = logits_of(ref_model, ids)
    del ref_model
    effect = ((ref - base).norm() / ref.norm()).item()
    result = {
        "transformers": transformers.__version__, "peft": peft.__version__, "torch": torch.__version__,
        "atol": ATOL, "rtol": RTOL, "shape": list(ref.shape), "lora_modules": n_lora, "lora_modules_expected": want_lora,
        "lora_b_nonzero": n_nonzero, "adapter_effect": effect, "mlora": {}, "peft_f32_gpu": None,
    }
    ok = n_lora == want_lora and n_nonzero == n_lora
    for dev, lg in sorted(mlora.items()):
        if tuple(lg.shape) != tuple(ref.shape):
            print(f"peft_check: logits_{dev} has shape {list(lg.shape)}, PEFT's is {list(ref.shape)}", file=sys.stderr)
            return 1
        c = compare(lg, ref)
        c["pass"] = c["worst_ratio"] <= 1 and effect >= 100 * c["rel_norm_err"]
        ok = ok and c["pass"]
        result["mlora"][dev] = c
    if torch.cuda.is_available():
        gpu_model = load(a.model, a.adapter, torch.float32, "cuda")
        g, _ = logits_of(gpu_model, ids)
        result["peft_f32_gpu"] = compare(g, ref)
        del gpu_model
    result["pass"] = ok
    print(f"peft_check: transformers {transformers.__version__}, peft {peft.__version__}; {n_lora}/{want_lora} LoRA modules, "
          f"{n_nonzero} with lora_B != 0; adapter effect ||peft-base||/||peft|| = {effect:.3e}")
    for dev, c in result["mlora"].items():
        print(f"peft_check: mlora {dev} vs PEFT float64: max|diff| {c['max_abs_diff']:.3e}, worst ratio {c['worst_ratio']:.3f} "
              f"(<= 1 at atol {ATOL}, rtol {RTOL}), rel err {c['rel_norm_err']:.3e} -> {'PASS' if c['pass'] else 'FAIL'}")
    if result["peft_f32_gpu"]:
        c = result["peft_f32_gpu"]
        print(f"peft_check: (information) PEFT float32 on cuda vs float64: max|diff| {c['max_abs_diff']:.3e}, rel err {c['rel_norm_err']:.3e}")
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
