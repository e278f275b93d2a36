"""Greedy decoding speed: our `fast_generate` vs HF `generate` on `LlamaForCausalLM` of the identical shape.

`python bench/bench_generate.py [--preset tiny] [--prompt-len 32] [--new-tokens 256] [--rounds 5] [--threads 1]`

Batch 1, fp32, a random prompt, greedy, exactly `--new-tokens` new tokens. Contenders (same weights,
built by `bench_lm_train.build_twins`, logits checked equal):
- `hf_llama`: `LlamaForCausalLM.generate(do_sample=False)`,
- `ours_hf_generate`: our model through the same HF `generate`,
- `ours_fast`: `vlm.generation.fast_generate` (preallocated KV cache, lean decode step).
No end token is configured for any of them (`eos_token_id=None` / `-1`), so all produce exactly
`--new-tokens` tokens with no stopping logic — the same as `min_new_tokens=N`, without charging HF for
the extra logits processor. The generated ids must be identical. Contenders take turns, the order
rotating each round; the JSON reports median tokens/s and the median of the per-round speed ratios,
by wall clock and by this process's CPU time (steadier on a shared machine; equal work per token).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import GenerationConfig

from bench_lm_train import build_twins
from vlm.generation import fast_generate


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny", help="model shape from training/presets.py (default: tiny)")
    p.add_argument("--vocab-size", type=int, help="override the preset's vocabulary size")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared; default 1)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    ours, llama, shape = build_twins(args.preset, args.vocab_size)
    ours.eval(), llama.eval()
    prompt = torch.randint(4, shape["vocab_size"], (1, args.prompt_len), generator=torch.Generator().manual_seed(1))
    n = args.new_tokens
    greedy = GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=None,
                              pad_token_id=ours.config.pad_token_id)
    contenders = {
        "hf_llama": lambda: llama.generate(prompt, generation_config=greedy)[:, args.prompt_len:],
        "ours_hf_generate": lambda: ours.generate(prompt, generation_config=greedy)[:, args.prompt_len:],
        "ours_fast": lambda: fast_generate(ours, prompt, n, eos_token_id=-1),
    }
    outputs = {k: f() for k, f in contenders.items()}  # warm-up, and the ids to compare
    times: dict[str, list[float]] = {k: [] for k in contenders}
    cpu: dict[str, list[float]] = {k: [] for k in contenders}
    names = list(contenders)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t0, c0 = time.perf_counter(), time.process_time()
            ids = contenders[name]()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            if ids.shape[1] != n:
                raise SystemExit(f"{name} produced {ids.shape[1]} tokens, expected {n}")

    ref = outputs["hf_llama"]
    result = {
        "bench": "generate", "preset": args.preset, "threads": args.threads, "batch": 1,
        "prompt_len": args.prompt_len, "new_tokens": n, "rounds": args.rounds, "shape": shape,
        "tokens_per_s": {k: round(n / statistics.median(v), 1) for k, v in times.items()},
        "tokens_per_cpu_s": {k: round(n / statistics.median(v), 1) for k, v in cpu.items()},
        "ids_identical": {k: bool(torch.equal(v, ref)) for k, v in outputs.items() if k != "hf_llama"},
    }
    for name in names[1:]:
        result[f"ratio_{name}_vs_hf_llama"] = round(statistics.median(
            h / o for h, o in zip(times["hf_llama"], times[name])), 2)
        result[f"cpu_ratio_{name}_vs_hf_llama"] = round(statistics.median(
            h / o for h, o in zip(cpu["hf_llama"], cpu[name])), 2)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
