"""The `micro` pipeline end to end: synth -> tokenizer -> pretrain -> SFT -> evaluate, then CLIP ->
VLM pretrain -> VLM SFT -> VQA, then the post-training stages -> report."""
import json

import pytest

from training.pipeline import main as pipeline_main


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("micro")
    report = pipeline_main(["--preset", "micro", "--out", str(out)])
    return out, report


def test_report_has_flat_metrics_and_timings(micro_run):
    out, report = micro_run
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == report
    for key in ("lm.ppl", "lm.context_qa_em", "lm.closed_qa_em", "lm.format_ok", "lm.context_qa_em.en",
                "lm.context_qa_em.zh", "time.pretrain_s", "time.sft_s", "time.total_s"):
        assert key in report, key
    assert 0.0 <= report["lm.context_qa_em"] <= 1.0
    md = (out / "report.md").read_text()
    assert "![pretrain loss](pretrain/loss.png)" in md and (out / "pretrain" / "loss.png").is_file()


def test_vlm_and_posttrain_sections(micro_run):
    out, report = micro_run
    for key in ("vlm.vqa_acc", "vlm.vqa_acc.unseen_combo", "vlm.vqa_acc.lang.en", "vlm.vqa_acc.lang.zh", "vlm.vqa_acc.type.count", "time.clip_s",
                "time.pretrain_vlm_s", "time.sft_vlm_s", "time.posttrain_s", "lora.trainable_ratio"):
        assert key in report, key
    assert 0.0 <= report["vlm.vqa_acc"] <= 1.0 and report["vlm.vqa_n"] == 30
    asked = [json.loads(line) for line in (out / "world" / "scenes" / "eval" / "vqa.jsonl").read_text().splitlines()][:30]
    assert {k for k in report if k.startswith("vlm.vqa_acc.kind.")} == {f"vlm.vqa_acc.kind.{r['kind']}" for r in asked}
    md = (out / "report.md").read_text()
    assert "VQA exact match by question type" in md and "![vlm_sft loss](vlm_sft/loss.png)" in md
    # the tokenizer saw every stage's text, the held-out splits never
    assert (out / "world" / "scenes" / "vlm_sft.jsonl").is_file() and (out / "world" / "posttrain").is_dir()


def test_training_reduced_the_loss_and_wrote_hf_folders(micro_run):
    out, report = micro_run
    rows = [json.loads(l) for l in (out / "pretrain" / "metrics.jsonl").read_text().splitlines() if l.strip()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0] - 0.5
    for stage in ("pretrain", "sft"):
        for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            assert (out / stage / name).is_file(), f"{stage}/{name}"
    # Learning happened: held-out perplexity is far below the uniform-guess perplexity (the vocab size).
    assert report["lm.ppl"] < 600 / 4


def test_rerun_skips_finished_stages(micro_run, capsys):
    out, _ = micro_run
    pipeline_main(["--preset", "micro", "--out", str(out)])
    log = capsys.readouterr().out
    for stage in ("synth", "tokenizer", "pretrain", "sft", "evaluate", "scene_images", "clip", "pretrain_vlm", "sft_vlm", "posttrain"):
        assert f"[pipeline] {stage}: already done" in log
