#!/usr/bin/env python3
"""The baseline mlora's GPU throughput must beat: transformers + PEFT training K LoRA adapters
one after another on one GPU, bf16, with the shapes `mlora bench --scenario gpu` uses.

    python3 scripts/device/peft_baseline.py --model bench=DIR --model 1b=DIR [--adapters 1,4,8]
        [--micro 2] [--seq-len 512] [--steps 3] [--rank 16] [--ceiling-n 8192] [--out JSON]

Per model (NAME=DIR, the names mlora's table uses): LlamaForCausalLM in bf16 with SDPA
attention, then for each K, K adapters in turn: get_peft_model (LoRA rank R, alpha 2R, dropout
0, all seven projections, as mlora's bench), AdamW over the LoRA parameters, STEPS steps of
MICRO sequences of SEQ_LEN random tokens under bf16 autocast, then unload() (LoRA removed,
the base model kept for the next adapter). tokens/s = K·STEPS·MICRO·SEQ_LEN / wall time of the
K adapters, timed after one warm-up adapter (CUDA context, kernels, allocator). Also measures
torch's bf16 matmul rate (N³, random data, CUDA events, median of 10 after 3 warm-ups) as the
hardware ceiling next to mlora's own. No network is used.
"""
import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def ints(s):
    v = [int(x) for x in s.split(",") if x]
    if not v or any(x < 1 for x in v):
        raise argparse.ArgumentTypeError(f"must be a list of positive integers, got {s!r}")
    return v


def named_dir(s):
    name, sep, d = s.partition("=")
    if not sep or not name or not os.path.isfile(os.path.join(d, "config.json")):
        raise argparse.ArgumentTypeError(f"must be NAME=DIR with DIR/config.json, got {s!r}")
    return name, d


def matmul_tflops(n):
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1000)
    return 2 * n**3 / statistics.median(times) / 1e12


def dtype_kwargs(transformers, dtype):
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=named_dir, action="append", required=True, help="NAME=DIR (repeatable)")
    ap.add_argument("--adapters", type=ints, default=[1, 4, 8])
    ap.add_argument("--micro", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--ceiling-n", type=int, default=8192)
    ap.add_argument("--out", help="JSON result file (mlora bench --baseline reads it)")
    a = ap.parse_args()
    import torch
    import transformers
    import peft
    from peft import LoraConfig, get_peft_model

    if not torch.cuda.is_available():
        print("peft_baseline: torch sees no CUDA device", file=sys.stderr)
        return 2
    ceiling = matmul_tflops(a.ceiling_n)
    print(f"peft_baseline: torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
          f"{torch.cuda.get_device_name()}; bf16 matmul {a.ceiling_n}^3: {ceiling:.1f} TFLOP/s", flush=True)
    records = []
    for name, d in a.model:
        t0 = time.perf_counter()
        model = transformers.LlamaForCausalLM.from_pretrained(
            d, local_files_only=True, attn_implementation="sdpa", **dtype_kwargs(transformers, torch.bfloat16)
        ).to("cuda")
        model.config.use_cache = False
        for p in model.parameters():
            p.requires_grad_(False)
        print(f"peft_baseline: {name}: loaded {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters in {time.perf_counter() - t0:.1f} s", flush=True)
        gen = torch.Generator(device="cuda").manual_seed(0)
        kmax = max(a.adapters)
        data = torch.randint(4, model.config.vocab_size, (kmax, a.steps, a.micro, a.seq_len), generator=gen, device="cuda")

        def train_one(base, k, steps):
            cfg = LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
            pm = get_peft_model(base, cfg)
            opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4)
            pm.train()
            for s in range(steps):
                x = data[k, s % a.steps]
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = pm(input_ids=x, labels=x).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            base = pm.unload()  # the LoRA modules removed, the frozen base kept
            if hasattr(base, "peft_config"):
                del base.peft_config
            return base, float(loss)

        model, _ = train_one(model, 0, 2)  # warm-up
        torch.cuda.reset_peak_memory_stats()
        for K in a.adapters:
            torch.cuda.synchronize()
            t = time.perf_counter()
            for k in range(K):
                model, loss = train_one(model, k, a.steps)
            dt = time.perf_counter() - t
            tokens = K * a.steps * a.micro * a.seq_len
            rec = {
                "model": name, "adapters": K, "micro_batch": a.micro, "seq_len": a.seq_len, "steps": a.steps, "rank": a.rank,
                "tokens_per_s": round(tokens / dt), "step_ms": round(1000 * dt / (K * a.steps), 1), "last_loss": round(loss, 4),
                "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            }
            records.append(rec)
            print(f"peft_baseline: {name} K={K}: {rec['tokens_per_s']} tok/s, {rec['step_ms']} ms per adapter step, peak {rec['peak_gib']} GiB", flush=True)
        del model
        torch.cuda.empty_cache()
    result = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
              "gpu": torch.cuda.get_device_name(), "torch_bf16_tflops": round(ceiling, 1), "records": records}
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
