"""Our LoRA (vlm/lora.py): exactness of merge, what trains, files on disk, several adapters, peft interop."""
import json

import pytest
import torch
from torch import nn

from vlm import MiniMindConfig, MiniMindForCausalLM
from vlm.lora import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoRAConfig, LoRALinear, add_lora, count_parameters,
                      find_targets, load_adapter, lora_layers, lora_trainable, mark_only_lora_trainable, merge_adapter,
                      merge_and_unload, save_adapter, set_active_adapter, unmerge_adapter)

ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_model(seed: int = 0) -> MiniMindForCausalLM:
    torch.manual_seed(seed)
    cfg = MiniMindConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=128)
    return MiniMindForCausalLM(cfg).eval()


def randomize_adapter(model, name="default", scale=0.05, seed=1):
    """A fresh adapter has B = 0 (no effect); give it weights so the tests can see it."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if f".lora_B.{name}." in n or f".lora_A.{name}." in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture
def ids():
    return torch.randint(4, 256, (2, 12), generator=torch.Generator().manual_seed(0))


def test_wraps_square_and_non_square_linears_and_starts_as_identity(ids):
    model = tiny_model()
    before = model(input_ids=ids).logits
    names = add_lora(model, LoRAConfig(r=2, lora_alpha=4, target_modules=ALL_PROJ))
    assert len(names) == 2 * 7
    k = model.model.layers[0].self_attn.k_proj
    assert isinstance(k, LoRALinear) and k.base_layer.out_features != k.base_layer.in_features  # GQA: 64 -> 32
    assert "lm_head" not in names and not any("base_layer" in n for n in names)
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)


def test_target_patterns_follow_peft_rules():
    model = tiny_model()
    assert find_targets(model, ["k_proj"]) == ["model.layers.0.self_attn.k_proj", "model.layers.1.self_attn.k_proj"]
    assert find_targets(model, r"model\.layers\.1\.mlp\.(up|down)_proj") == ["model.layers.1.mlp.up_proj",
                                                                            "model.layers.1.mlp.down_proj"]
    all_linear = find_targets(model, "all-linear")
    assert len(all_linear) == 14 and "lm_head" not in all_linear
    with pytest.raises(ValueError, match="match no nn.Linear"):
        add_lora(model, LoRAConfig(target_modules=["nope"]))


def test_only_adapter_params_train_and_they_are_few(ids):
    model = tiny_model().train()
    add_lora(model, LoRAConfig(r=2, lora_alpha=4, target_modules=ALL_PROJ))
    n_train = mark_only_lora_trainable(model)
    base, lora = count_parameters(model)
    assert n_train == lora and lora / base <= 0.05, (lora, base)
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    keep = lora_trainable("default")
    for n, p in model.named_parameters():
        changed = not torch.equal(p, snapshot[n])
        assert changed == keep(n, p), f"{n}: changed={changed}, trainable={keep(n, p)}"


def test_merged_logits_equal_adapter_logits_and_unmerge_restores(ids):
    model = tiny_model()
    base_logits = model(input_ids=ids).logits
    add_lora(model, LoRAConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    randomize_adapter(model)
    adapter_logits = model(input_ids=ids).logits
    assert (adapter_logits - base_logits).abs().max() > 1e-3  # the adapter does something
    merge_adapter(model)
    assert (model(input_ids=ids).logits - adapter_logits).abs().max() <= 1e-5
    unmerge_adapter(model)
    assert (model(input_ids=ids).logits - adapter_logits).abs().max() <= 1e-5
    set_active_adapter(model, None)
    assert (model(input_ids=ids).logits - base_logits).abs().max() <= 1e-5
    set_active_adapter(model, "default")
    plain = merge_and_unload(model)
    assert not any(isinstance(m, LoRALinear) for m in plain.modules())
    assert (plain(input_ids=ids).logits - adapter_logits).abs().max() <= 1e-5


def test_adapter_file_is_small_and_reloads_onto_a_fresh_base(tmp_path, ids):
    model = tiny_model()
    model.save_pretrained(tmp_path / "base")
    add_lora(model, LoRAConfig(r=2, lora_alpha=4, target_modules=ALL_PROJ, base_model_name_or_path="base"))
    randomize_adapter(model)
    want = model(input_ids=ids).logits
    save_adapter(model, tmp_path / "adapter")
    adapter_bytes = (tmp_path / "adapter" / ADAPTER_WEIGHTS).stat().st_size
    base_bytes = (tmp_path / "base" / "model.safetensors").stat().st_size
    assert adapter_bytes <= 0.10 * base_bytes, (adapter_bytes, base_bytes)
    cfg = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 2 and cfg["target_modules"] == ALL_PROJ

    fresh = MiniMindForCausalLM.from_pretrained(tmp_path / "base").eval()
    load_adapter(fresh, tmp_path / "adapter")
    assert (fresh(input_ids=ids).logits - want).abs().max() <= 1e-6

    other = tiny_model()
    other.model.layers = other.model.layers[:1]  # a model without layer 1: the adapter does not fit
    with pytest.raises(ValueError, match="does not fit"):
        load_adapter(other, tmp_path / "adapter")


def test_several_adapters_side_by_side(ids):
    model = tiny_model()
    base_logits = model(input_ids=ids).logits
    add_lora(model, LoRAConfig(r=2, target_modules=["q_proj", "v_proj"]), "law")
    add_lora(model, LoRAConfig(r=4, target_modules=["down_proj"]), "medicine")
    randomize_adapter(model, "law", seed=1)
    randomize_adapter(model, "medicine", seed=2)
    set_active_adapter(model, "law")
    law = model(input_ids=ids).logits
    set_active_adapter(model, "medicine")
    med = model(input_ids=ids).logits
    merge_adapter(model)
    set_active_adapter(model, "law")  # switching unmerges medicine first
    assert (model(input_ids=ids).logits - law).abs().max() <= 1e-5
    assert (law - med).abs().max() > 1e-3 and (law - base_logits).abs().max() > 1e-3
    set_active_adapter(model, None)
    assert (model(input_ids=ids).logits - base_logits).abs().max() <= 1e-5
    with pytest.raises(KeyError):
        set_active_adapter(model, "astrology")


def test_peft_loads_our_adapter_folder_and_gives_the_same_logits(tmp_path, ids):
    peft = pytest.importorskip("peft")
    model = tiny_model()
    model.save_pretrained(tmp_path / "base")
    add_lora(model, LoRAConfig(r=2, lora_alpha=4, target_modules=ALL_PROJ))
    randomize_adapter(model)
    want = model(input_ids=ids).logits
    save_adapter(model, tmp_path / "adapter")

    base = MiniMindForCausalLM.from_pretrained(tmp_path / "base").eval()
    assert (base(input_ids=ids).logits - want).abs().max() > 1e-3
    peft_model = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    got = peft_model(input_ids=ids).logits
    assert (got - want).abs().max() <= 1e-5
    # And the reverse: an adapter saved by peft loads into ours.
    peft_model.save_pretrained(tmp_path / "from_peft")
    ours = MiniMindForCausalLM.from_pretrained(tmp_path / "base").eval()
    load_adapter(ours, tmp_path / "from_peft")
    assert (ours(input_ids=ids).logits - want).abs().max() <= 1e-5


def test_composes_with_torch_compile_without_graph_breaks(ids):
    model = tiny_model()
    add_lora(model, LoRAConfig(r=2, target_modules=ALL_PROJ))
    randomize_adapter(model)
    want = model(input_ids=ids).logits
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # fullgraph: any graph break is an error
    assert (compiled(input_ids=ids).logits - want).abs().max() <= 1e-5


def test_lora_on_a_linear_inside_any_module():
    """Not tied to MiniMind: any nn.Module with Linears (e.g. a VLM wrapping the LM and a projector)."""
    net = nn.Sequential(nn.Linear(10, 7), nn.ReLU(), nn.Linear(7, 3))
    x = torch.randn(5, 10)
    add_lora(net, LoRAConfig(r=2, target_modules=["0", "2"]))
    randomize_adapter(net, scale=0.3)
    y = net(x)
    merge_adapter(net)
    assert (net(x) - y).abs().max() <= 1e-5


def test_fused_decoding_sees_the_adapter_once_merged(ids):
    """vlm.generation fuses Linear weights; with an unmerged adapter that would drop it silently, so it
    is an error, and after merging the fast path decodes exactly like the adapter-on model."""
    from vlm.generation import fast_generate

    model = tiny_model()
    add_lora(model, LoRAConfig(r=2, target_modules=ALL_PROJ))
    randomize_adapter(model, scale=0.2)
    with pytest.raises(RuntimeError, match="merge_adapter"):
        fast_generate(model, ids, 4)
    want = ids
    with torch.no_grad():
        for _ in range(4):  # greedy, adapter-on, full forward each step
            want = torch.cat([want, model(input_ids=want).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    merge_adapter(model)
    got = fast_generate(model, ids, 4, eos_token_id=-1)
    assert torch.equal(got, want[:, ids.shape[1]:])


def test_replay_spreads_distinct_base_samples_over_the_run():
    from torch.utils.data import TensorDataset

    from training.lora import with_replay
    new, base = TensorDataset(torch.arange(10)), TensorDataset(torch.arange(100, 1000))
    mixed = with_replay(new, base, ratio=0.25, total=400, seed=0)
    values = [int(mixed[i][0]) for i in range(len(mixed))]
    replayed = [v for v in values if v >= 100]
    assert len(values) == 400 and len(replayed) == 80
    assert len(set(replayed)) == 80  # no base sample is repeated within the run
    assert values.count(3) == 32  # the new data fills the rest, each sample equally often
    # without a known run length: ratio * len(new) base samples, once
    assert len(with_replay(new, base, ratio=0.5, total=None, seed=0)) == 15


def test_replay_kl_holds_replayed_rows_to_the_base_and_trains_only_the_adapter():
    import torch.nn.functional as F

    from data.collate import pad_collate
    from training.lm_stage import causal_lm_loss
    from training.lora import Tagged, replay_kl_loss
    model = tiny_model()
    add_lora(model, LoRAConfig(r=4, lora_alpha=8, target_modules=ALL_PROJ))
    mark_only_lora_trainable(model)
    g = torch.Generator().manual_seed(3)
    rows = [{"input_ids": torch.randint(4, 256, (n,), generator=g)} for n in (9, 12, 7)]
    for r in rows:
        r["labels"] = r["input_ids"].clone()
        r["labels"][:3] = -100  # a prompt
    items = [Tagged([rows[0]], False)[0], Tagged([rows[1]], True)[0], Tagged([rows[2]], True)[0]]
    batch = pad_collate(items)
    loss = replay_kl_loss()
    # a fresh adapter is the base: the replayed rows cost nothing, the new row its plain CE
    fresh = loss(model, batch)
    new_only = causal_lm_loss(model, pad_collate([{k: v for k, v in items[0].items() if k != "replay"}]))
    assert fresh.metrics["replay_kl"] == 0.0
    assert torch.allclose(fresh.loss_sum, new_only.loss_sum, atol=1e-5)
    assert fresh.count == sum(int((r["labels"][1:] != -100).sum()) for r in rows)
    # a trained adapter: the replay term is KL(base || adapted) on the replayed rows' supervised positions
    randomize_adapter(model, scale=0.2)
    out = loss(model, batch)
    new_only_ce = causal_lm_loss(model, pad_collate([{k: v for k, v in items[0].items() if k != "replay"}])).loss_sum
    want = new_only_ce
    for r in rows[1:]:
        keep = r["labels"][1:] != -100
        adapted = F.log_softmax(model(input_ids=r["input_ids"][None]).logits[0, :-1][keep], -1)
        set_active_adapter(model, None)
        base = F.log_softmax(model(input_ids=r["input_ids"][None]).logits[0, :-1][keep], -1)
        set_active_adapter(model, "default")
        want = want + (base.exp() * (base - adapted)).sum()
    assert out.metrics["replay_kl"] > 0 and torch.allclose(out.loss_sum, want, rtol=1e-4)
    assert not torch.allclose(out.loss_sum, new_only_ce)
    out.loss_sum.backward()
    assert all(((p.grad is not None) == (".lora_" in n)) for n, p in model.named_parameters() if p.requires_grad)
    assert all(p.grad is None for n, p in model.named_parameters() if ".lora_" not in n)
    assert all(layer.active_adapter == "default" for _, layer in lora_layers(model))  # switched back on
