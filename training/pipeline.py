"""Every stage in order: `python -m training.pipeline --preset {micro,tiny,small} --out DIR`.

lm:   synth (world + scene texts + post-training data) -> tokenizer -> pretrain -> sft -> evaluate
vlm:  scene images -> clip (from-scratch CLIP on the scenes) -> pretrain_vlm -> sft_vlm -> VQA evaluation
post: LoRA, DPO, distillation, reasoning distillation, GRPO (each measured on held-out data)

Each stage writes its own sub-folder of DIR; DIR/report.json holds flat metric names and stage wall
times, DIR/report.md the tables and loss plots. `--stages lm,vlm` picks groups (default: all).
A stage whose output folder already holds a finished model is skipped unless --force is given,
so an interrupted pipeline continues where it stopped.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Callable

from training.presets import get_preset


def _done(folder: Path, marker: str) -> bool:
    return (folder / marker).exists()


GROUPS = ("lm", "vlm", "post")
# pretrain_vlm trains the whole LM in the pipeline; tiny: longer than the stage's projector-only default
VLM_PRETRAIN_FLAGS = {"tiny": ["--max-steps", "800", "--lr", "1e-3"]}


def build_steps(out: Path, preset_name: str, seed: int, extra: list[str],
                groups: tuple[str, ...] = GROUPS) -> list[tuple[str, str, Callable[[], dict | None]]]:
    """(name, marker file that proves it finished, function) for each stage of the chosen groups."""
    preset = get_preset(preset_name)
    world, tok, scenes = out / "world", out / "world" / "tokenizer", out / "world" / "scenes"
    common = ["--preset", preset_name, "--seed", str(seed), *extra]

    def synth():  # every part's text before the tokenizer, so that its vocabulary covers every stage
        from data.synth.__main__ import main as synth_main
        synth_main(["--out", str(world), "--seed", str(seed), "--scale", preset["synth_scale"], "--no-images"])

    def scene_images():  # only the vision stages look at pictures
        from data.scenes import write_scene_splits
        write_scene_splits(scenes, seed=seed, scale=preset["synth_scale"], images=True)

    def tokenizer():
        from training.train_tokenizer import main as tok_main
        per_file = preset.get("tokenizer_chars_per_file")
        tok_main(["--data", str(world), "--out", str(tok), "--vocab-size", str(preset["vocab_size"]),
                  *(["--max-chars-per-file", str(per_file)] if per_file else [])])

    def pretrain():
        from training.pretrain import main as pretrain_main
        return pretrain_main(["--data", str(world), "--out", str(out / "pretrain"), *common])

    def sft():
        from training.sft import main as sft_main
        return sft_main(["--data", str(world), "--init", str(out / "pretrain"), "--out", str(out / "sft"), *common])

    def evaluate():
        from training.evaluate import evaluate as run_eval
        metrics = run_eval(out / "sft", world, limit=preset["eval_limit"], samples_out=out / "eval_samples.jsonl")
        base = run_eval(out / "pretrain", world, limit=preset["eval_limit"], tasks=("ppl",))
        metrics["lm.pretrain_ppl"] = base.get("lm.ppl", float("nan"))
        (out / "eval.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False), encoding="utf-8")
        return metrics

    def clip():
        from training.pretrain_clip import main as clip_main
        return clip_main(["--data", str(scenes), "--out", str(out / "clip"), *common])

    def pretrain_vlm():
        from training.pretrain_vlm import main as pretrain_vlm_main
        # Our CLIP's 8x8 patch grid enters the LM as 4x4 pixel-shuffled tokens with a learned slot
        # embedding each: same VQA as 64 plain tokens (tiny, one LM: 0.567 vs 0.563, position 0.75 vs
        # 0.725; shuffle alone 0.533, position 0.50) at less than half the VLM SFT time. The RMSNorm
        # keeps the tokens at the words' scale, where a slot embedding is readable (seed-42 LM: VQA
        # 0.50 -> 0.54, position 0.20 -> 0.75). The whole LM trains on the captions (800 steps, not the
        # stage's 300 projector-only ones): our LM never saw the scene words, and the projector alone
        # leaves the caption loss at 5.75 a token (all_lm: 0.17); VQA after SFT 0.54 -> 0.573. Skipping this stage and
        # spending its time on VLM SFT (4300 steps from the LM) gives less: VQA 0.627 vs 0.693 (seed 42, 2026-12-05).
        return pretrain_vlm_main(["--data", str(scenes), "--init", str(out / "sft"), "--vision", str(out / "clip"),
                                  "--out", str(out / "vlm_pretrain"), "--projector-shuffle", "2",
                                  "--projector-positions", "1", "--projector-norm", "1",
                                  "--freeze", "all_lm", *VLM_PRETRAIN_FLAGS.get(preset_name, []), *common])

    def sft_vlm():
        from training.sft_vlm import main as sft_vlm_main
        # all_lm rather than the stage default (projector + first/last layers): our LM learned only the
        # world's text, so the words of the scenes are new to it (tiny: VQA 0.44 vs 0.31 with first/last)
        return sft_vlm_main(["--data", str(scenes), "--init", str(out / "vlm_pretrain"), "--out", str(out / "vlm_sft"),
                             "--freeze", "all_lm", "--eval-n", str(preset["vqa_limit"]), *common])

    def posttrain():
        from training.posttrain_pipeline import run_posttrain
        return run_posttrain(out / "post", world, preset_name, out / "sft")

    steps = {
        "lm": [("synth", "world/posttrain/manifest.json", synth),
               ("tokenizer", "world/tokenizer/tokenizer.json", tokenizer),
               ("pretrain", "pretrain/model.safetensors", pretrain),
               ("sft", "sft/model.safetensors", sft),
               ("evaluate", "eval.json", evaluate)],
        "vlm": [("scene_images", "world/scenes/images/rendered.json", scene_images),
                ("clip", "clip/retrieval.json", clip),
                ("pretrain_vlm", "vlm_pretrain/model.safetensors", pretrain_vlm),
                ("sft_vlm", "vlm_sft/vqa.json", sft_vlm)],
        "post": [("posttrain", "post/posttrain.json", posttrain)],
    }
    return [step for group in GROUPS if group in groups for step in steps[group]]


def collect_metrics(out: Path) -> dict[str, float]:
    """The flat metrics every finished stage left on disk."""
    metrics: dict[str, float] = {}
    for name in ("eval.json", "vlm_sft/vqa.json", "post/posttrain.json"):
        if (out / name).is_file():
            metrics |= json.loads((out / name).read_text(encoding="utf-8"))
    retrieval = out / "clip" / "retrieval.json"
    if retrieval.is_file():
        for key, value in _flatten(json.loads(retrieval.read_text(encoding="utf-8")), "clip").items():
            metrics[key] = value
    return metrics


def _flatten(obj, prefix: str) -> dict[str, float]:
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in _flatten(val, f"{prefix}.{key}").items()}
    return {prefix: obj} if isinstance(obj, (int, float)) else {}


def write_report(out: Path, preset: str, timings: dict[str, float], metrics: dict[str, float]) -> dict:
    report = {"preset": preset, **{f"time.{k}_s": round(v, 1) for k, v in timings.items()},
              "time.total_s": round(sum(timings.values()), 1), **metrics}
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    lines = [f"# Pipeline report: preset `{preset}`", "", "| metric | value |", "| --- | --- |"]
    lines += [f"| `{k}` | {v:.4g} |" if isinstance(v, float) else f"| `{k}` | {v} |" for k, v in report.items()]
    vqa = {k[len("vlm.vqa_acc."):]: v for k, v in report.items() if k.startswith("vlm.vqa_acc.")}
    if vqa:
        lines += ["", "## VQA exact match by question type (held-out scenes)", "", "| group | accuracy |", "| --- | --- |"]
        lines += [f"| {k} | {v:.3f} |" for k, v in sorted(vqa.items())]
    lines += ["", "## Loss curves", ""]
    for stage in ("pretrain", "sft", "clip", "vlm_pretrain", "vlm_sft"):
        if (out / stage / "loss.png").is_file():
            lines += [f"### {stage}", "", f"![{stage} loss]({stage}/loss.png)", ""]
    if (out / "eval_samples.jsonl").is_file():
        lines += ["## Sample answers (held-out)", "", "| set | question | expected | model |", "| --- | --- | --- | --- |"]
        with open(out / "eval_samples.jsonl", encoding="utf-8") as fh:
            for line in list(fh)[:12]:
                s = json.loads(line)
                cells = [s["set"], s["prompt"][-80:], s["answer"], s["output"]]
                lines.append("| " + " | ".join(c.replace("|", "/").replace("\n", " ") for c in cells) + " |")
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return report


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m training.pipeline", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--force", action="store_true", help="rerun stages that already finished")
    p.add_argument("--stages", default=",".join(GROUPS), help=f"comma-separated groups out of {','.join(GROUPS)}")
    p.add_argument("--device", default=None, help="passed to the LM and VLM stages (cpu, cuda, auto)")
    p.add_argument("--dtype", default=None, help="passed to the LM and VLM stages (fp32, bf16, auto)")
    p.add_argument("--compile", action="store_true", help="passed to the LM and VLM stages (torch.compile of the decoder blocks)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    extra = [f for flag, val in (("--device", args.device), ("--dtype", args.dtype)) if val for f in (flag, val)]
    extra += ["--compile"] if args.compile else []
    timings_file = out / "timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.is_file() and not args.force else {}
    groups = tuple(g.strip() for g in args.stages.split(",") if g.strip())
    if unknown := set(groups) - set(GROUPS):
        raise SystemExit(f"--stages: unknown group(s) {sorted(unknown)}; choose from {','.join(GROUPS)}")
    if "lm" not in groups and not (out / "sft" / "model.safetensors").is_file():
        raise SystemExit(f"--stages {args.stages}: the vlm and post stages start from {out}/sft; run the lm group first")
    for name, marker, fn in build_steps(out, args.preset, args.seed, extra, groups):
        if not args.force and _done(out, marker):
            print(f"[pipeline] {name}: already done ({marker}), skipping")
        else:
            print(f"[pipeline] {name} ...", flush=True)
            t0 = time.perf_counter()
            fn()
            timings[name] = time.perf_counter() - t0
            timings_file.write_text(json.dumps(timings, indent=2))
    metrics = collect_metrics(out)
    report = write_report(out, args.preset, timings, metrics)
    print(json.dumps(report, indent=2, ensure_ascii=False))
    return report


if __name__ == "__main__":
    main()
