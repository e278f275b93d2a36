"""VLM stages through the shared Trainer: freeze policies leave everything else bit-identical."""
import pytest
import torch

pytest.importorskip("training.trainer", reason="the shared Trainer is not in this checkout yet")

import vlm  # noqa: E402
from data.scenes import write_scene_splits  # noqa: E402
from training import pretrain_vlm, sft_vlm  # noqa: E402
from training.freeze import trainable_predicate  # noqa: E402
from training.train_tokenizer import main as train_tokenizer  # noqa: E402
from vlm.modeling_vlm import MiniMindVLM  # noqa: E402
from vlm.tokenizer import load_tokenizer  # noqa: E402
from vlm.vision import VisionEncoder  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm_stage")
    world = root / "world"
    write_scene_splits(world, seed=0, scale="micro")
    train_tokenizer(["--data", str(world), "--out", str(root / "tok"), "--vocab-size", "400"])
    tok = load_tokenizer(root / "tok")
    torch.manual_seed(0)
    lm = vlm.MiniMindForCausalLM(vlm.MiniMindConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=3,
                                                    num_attention_heads=4, num_key_value_heads=2))
    lm.save_pretrained(root / "lm")
    tok.save_pretrained(root / "lm")
    return root, world


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def check_only_trainable_changed(before: dict, after_model: MiniMindVLM, policy: str) -> None:
    keep = trainable_predicate(policy, after_model.config.num_hidden_layers)
    after = after_model.state_dict()
    assert set(before) == set(after)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    frozen_changed = sorted(k for k in changed if not keep(k, None))  # lm_head is tied to the frozen embeddings
    assert not frozen_changed, f"{policy}: frozen parameters changed: {frozen_changed[:5]}"
    assert any(k.startswith("projector.") for k in changed), "the projector did not train"
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("vision."))


def test_pretrain_then_sft_respect_their_freeze_policies(setup, tmp_path):
    root, world = setup
    common = ["--data", str(world), "--preset", "micro", "--max-steps", "3", "--batch-size", "4", "--device", "cpu",
              "--dtype", "fp32", "--feature-cache", str(tmp_path / "cache")]
    pretrain_vlm.main([*common, "--init", str(root / "lm"), "--out", str(tmp_path / "pre"),
                       "--vision", "minimind-clip-tiny"])
    pre = MiniMindVLM.from_pretrained(tmp_path / "pre")
    # starting values: the LM checkpoint, the (seeded) random encoder, a fresh projector
    lm = vlm.MiniMindForCausalLM.from_pretrained(root / "lm")
    start = {**{k: v for k, v in lm.state_dict().items()},
             **{f"vision.{k}": v for k, v in VisionEncoder.from_open_clip("minimind-clip-tiny").state_dict().items()},
             **{k: torch.full_like(v, float("nan")) for k, v in pre.state_dict().items() if k.startswith("projector.")}}
    check_only_trainable_changed(start, pre, "projector")

    before = state(pre)
    # SFT without the cache (images encoded every step) and the default projector+first_last policy
    sft_vlm.main([*common[:-1], "none", "--init", str(tmp_path / "pre"), "--out", str(tmp_path / "sft"),
                  "--eval-n", "4"])
    sft = MiniMindVLM.from_pretrained(tmp_path / "sft")
    check_only_trainable_changed(before, sft, "projector+first_last")
    after = sft.state_dict()
    assert not torch.equal(before["model.layers.0.self_attn.q_proj.weight"], after["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(before["model.layers.1.self_attn.q_proj.weight"], after["model.layers.1.self_attn.q_proj.weight"])
    assert (tmp_path / "sft" / "vqa.json").is_file() and (tmp_path / "sft" / "processor_config.json").is_file()


def test_image_readout_trains_under_the_projector_only_policy(setup, tmp_path):
    root, world = setup
    pretrain_vlm.main(["--data", str(world), "--preset", "micro", "--max-steps", "3", "--batch-size", "4",
                       "--device", "cpu", "--dtype", "fp32", "--init", str(root / "lm"), "--out", str(tmp_path / "pre"),
                       "--vision", "minimind-clip-micro", "--cross-attention-layers", "1", "--feature-cache", "none"])
    pre = MiniMindVLM.from_pretrained(tmp_path / "pre")
    assert pre.config.cross_attention_layers == [1] and list(pre.image_readout) == ["1"]
    lm = vlm.MiniMindForCausalLM.from_pretrained(root / "lm").state_dict()
    after = pre.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in lm.items()), "the LM trained under --freeze projector"
    assert float(pre.image_readout["1"].o_proj.weight.abs().sum()) > 0, "the read-out did not train"
    assert trainable_predicate("projector", 3)("image_readout.1.q_proj.weight")


def test_sft_with_several_questions_per_image_and_pixel_shuffle(setup, tmp_path):
    root, world = setup
    common = ["--data", str(world), "--preset", "micro", "--max-steps", "2", "--batch-size", "4", "--device", "cpu",
              "--dtype", "fp32"]
    pretrain_vlm.main([*common, "--feature-cache", str(tmp_path / "cache"), "--init", str(root / "lm"),
                       "--out", str(tmp_path / "pre"), "--vision", "minimind-clip-tiny", "--projector-shuffle", "2",
                       "--image-attention", "bidirectional"])
    # the cache holds the encoder's 64 patches per image; the LM sees 16 shuffled tokens
    pre = MiniMindVLM.from_pretrained(tmp_path / "pre").config
    assert pre.num_image_tokens == 16 and pre.image_attention == "bidirectional"
    # the grouped copy lives in OUT: images, feature cache and eval questions must still come from DATA
    summary = sft_vlm.main([*common, "--init", str(tmp_path / "pre"), "--out", str(tmp_path / "sft"),
                            "--eval-n", "4", "--turns-per-image", "4"])
    grouped = (tmp_path / "sft" / "vlm_sft_grouped.jsonl").read_text(encoding="utf-8").splitlines()
    single = (world / "vlm_sft.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(grouped) < len(single) and '"role": "assistant"' in grouped[0]
    assert summary["vlm.vqa_n"] == 4 and (tmp_path / "sft" / "vqa.json").is_file()


@pytest.mark.parametrize("image_attention,readout", [("causal", []), ("bidirectional", []), ("causal", [0, 2])])
def test_vlm_loss_on_answer_positions_equals_the_full_logits_loss(setup, image_attention, readout):
    """The head runs on supervised positions only; loss and gradients equal the `labels=` loss
    (with bidirectional image attention and with an image read-out too: the stage's loss builds the
    same mask and reads the images as `forward` does)."""
    from data.vlm_datasets import VLMDataset, open_source, vlm_collate

    root, world = setup
    tok = load_tokenizer(root / "lm")
    model = MiniMindVLM.from_lm(vlm.MiniMindForCausalLM.from_pretrained(root / "lm"),
                                VisionEncoder.from_open_clip("minimind-clip-micro"), projector_shuffle=2,
                                image_attention=image_attention, cross_attention_layers=readout).double()
    for block in model.image_readout.values():
        block.o_proj.weight.data.normal_(0.0, 0.1)  # open, so that every read-out weight gets gradients
    data = VLMDataset(open_source(world / "vlm_sft.jsonl", str(world / "images")), tok, model.num_image_tokens, 64,
                      preprocess=model.vision.preprocess)
    batch = vlm_collate([data[i] for i in range(6)])
    batch["pixel_values"] = batch["pixel_values"].double()
    out = pretrain_vlm.vlm_loss(model, batch)
    out.loss_sum.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    reference = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      pixel_values=batch["pixel_values"], labels=batch["labels"]).loss
    assert out.count == int((batch["labels"][:, 1:] != -100).sum()) > 6
    assert torch.allclose(out.loss_sum / out.count, reference, atol=1e-12)
    (reference * out.count).backward()
    for name, p in model.named_parameters():
        if name in ours:
            assert torch.allclose(ours[name], p.grad, atol=1e-10), name
    if readout:
        assert float(ours["image_readout.2.q_proj.weight"].abs().sum()) > 0
