"""The MiniMind LM: cache consistency, lean decoding, strict loading, MoE, YaRN, HF integration."""
import threading

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, TextIteratorStreamer

import vlm
from vlm.generation import decode_weights, fast_generate, sample_next

VOCAB = 320


def tiny(moe: bool = False, **kw) -> vlm.MiniMindForCausalLM:
    torch.manual_seed(0)
    cfg = vlm.MiniMindConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, use_moe=moe, num_experts=4, num_experts_per_tok=2,
                             n_shared_experts=1 if moe else 0, **kw)
    return vlm.MiniMindForCausalLM(cfg).eval()


@pytest.mark.parametrize("moe", [False, True])
def test_kv_cache_greedy_equals_no_cache(moe):
    model = tiny(moe)
    prompt = torch.randint(4, VOCAB, (2, 12))
    kw = dict(max_new_tokens=64, min_new_tokens=64, do_sample=False, output_logits=True, return_dict_in_generate=True)
    cached = model.generate(prompt, use_cache=True, **kw)
    uncached = model.generate(prompt, use_cache=False, **kw)
    assert cached.sequences.shape[1] == 12 + 64
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.logits, uncached.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_decode_weights_are_stored_in_one_row_gemm_layout():
    """[in, out] and contiguous: a transposed view with the norm gain folded in keeps [out, in]
    strides, which made every decode GEMV ~2.4x slower (bench/README.md)."""
    model = tiny()
    weights = [w for w in decode_weights(model) if w is not None and w.ndim == 2]
    assert len(weights) == 4 * 2 + 1 and all(w.is_contiguous() for w in weights)
    assert weights[0].shape == (64, 64 + 2 * 2 * 16)  # q/k/v fused: hidden in, q + k + v heads out
    assert weights[-1].shape == (64, VOCAB)


@pytest.mark.parametrize("moe", [False, True])
def test_fast_generate_matches_hf_generate(moe):
    model = tiny(moe)
    prompt = torch.randint(4, VOCAB, (1, 9))
    hf = model.generate(prompt, max_new_tokens=40, min_new_tokens=40, do_sample=False)[:, 9:]
    ours = fast_generate(model, prompt, max_new_tokens=40, eos_token_id=-1)
    assert torch.equal(hf, ours)


def test_left_padded_batch_equals_single_prompts():
    model = tiny()
    a, b = torch.randint(4, VOCAB, (1, 10)), torch.randint(4, VOCAB, (1, 6))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :4] = 0
    together = fast_generate(model, batch, 20, attention_mask=mask, eos_token_id=-1)
    assert torch.equal(together[0], fast_generate(model, a, 20, eos_token_id=-1)[0])
    assert torch.equal(together[1], fast_generate(model, b, 20, eos_token_id=-1)[0])
    hf = model.generate(batch, attention_mask=mask, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    assert torch.equal(hf[:, 10:], together)


def test_generation_stops_at_eos_and_streams():
    model = tiny()
    prompt = torch.randint(4, VOCAB, (1, 5))
    first = fast_generate(model, prompt, 1)[0, 0].item()
    out = fast_generate(model, prompt, 30, eos_token_id=first)
    assert out.shape[1] == 1  # stopped right after emitting the end token

    class Collect:
        def __init__(self):
            self.ids, self.ended = [], False

        def put(self, ids):
            self.ids.append(int(ids[0]))

        def end(self):
            self.ended = True

    streamer = Collect()
    out = fast_generate(model, prompt, 12, eos_token_id=-1, streamer=streamer)
    assert streamer.ended and streamer.ids == out[0].tolist()


def test_sampling_controls():
    torch.manual_seed(0)
    logits = torch.tensor([[5.0, 4.0, 1.0, -2.0]])
    g = torch.Generator().manual_seed(0)
    assert {int(sample_next(logits, None, temperature=1.0, top_k=2, generator=g)) for _ in range(200)} <= {0, 1}
    assert {int(sample_next(logits, None, temperature=1.0, top_p=0.5, generator=g)) for _ in range(50)} == {0}
    # A strong repetition penalty moves greedy decoding off the already-seen best token.
    assert int(sample_next(logits, torch.tensor([[0]]), repetition_penalty=2.0)) == 1


def test_hf_generate_sampling_with_text_streamer(tmp_path):
    from training.train_tokenizer import train_tokenizer
    from vlm.tokenizer import load_tokenizer

    train_tokenizer(["hello world, a small model talks."] * 20, tmp_path, vocab_size=300)
    tok = load_tokenizer(tmp_path)
    model = tiny()
    streamer = TextIteratorStreamer(tok, skip_prompt=True)
    ids = tok("hello", return_tensors="pt").input_ids
    kw = dict(max_new_tokens=16, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.2, streamer=streamer)
    thread = threading.Thread(target=model.generate, args=(ids,), kwargs=kw)
    thread.start()
    text = "".join(streamer)
    thread.join()
    assert isinstance(text, str) and len(text) > 0


def test_save_load_roundtrip_and_auto_classes(tmp_path):
    model = tiny(moe=True)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not list(tmp_path.glob("*.bin"))
    assert AutoConfig.from_pretrained(tmp_path).model_type == "minimind"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, vlm.MiniMindForCausalLM)
    ids = torch.randint(4, VOCAB, (2, 7))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_mismatched_checkpoint_is_an_error(tmp_path):
    from safetensors.torch import load_file, save_file

    tiny().save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state.pop("model.norm.weight")
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="model.norm.weight"):
        vlm.MiniMindForCausalLM.from_pretrained(tmp_path)
    bigger = tiny(); bigger.config.hidden_size = 128  # noqa: E702 - config now disagrees with the weights
    bigger.config.save_pretrained(tmp_path)
    with pytest.raises(Exception):
        vlm.MiniMindForCausalLM.from_pretrained(tmp_path)


def test_moe_aux_loss_is_added_and_trains_the_router():
    model = tiny(moe=True).train()
    ids = torch.randint(4, VOCAB, (2, 16))
    out = model(ids, labels=ids)
    assert out.aux_loss is not None and out.aux_loss.item() > 0
    plain = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(out.loss, plain + out.aux_loss)
    out.loss.backward()
    assert model.model.layers[0].mlp.gate.weight.grad.abs().sum() > 0


def test_yarn_scales_low_frequencies_only():
    base, yarn = tiny(), tiny(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})
    f0, f1 = base.model.inv_freq, yarn.model.inv_freq
    assert torch.isclose(f1[0], f0[0]) and torch.isclose(f1[-1], f0[-1] / 4)
    assert yarn.config.rope_parameters["rope_type"] == "yarn"
    assert torch.isfinite(yarn(torch.randint(4, VOCAB, (1, 200))).logits).all()


def test_gqa_and_tied_embeddings():
    model = tiny()
    attn = model.model.layers[0].self_attn
    assert attn.k_proj.out_features == attn.q_proj.out_features // 2
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("kind", ["dense", "moe", "yarn"])
def test_lean_decode_step_matches_module_forward(kind):
    from vlm.generation import LeanDecoder, StaticKVCache

    yarn = {"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}}
    model = tiny(kind == "moe", **(yarn if kind == "yarn" else {}))
    cfg, core = model.config, model.model
    prompt = torch.randint(4, VOCAB, (2, 7))
    caches = [StaticKVCache(cfg.num_hidden_layers, 2, cfg.num_key_value_heads, 20, cfg.head_dim, "cpu", torch.float32)
              for _ in range(2)]
    positions = torch.arange(7)[None].expand(2, -1)
    with torch.inference_mode():
        for cache in caches:
            core(prompt, None, positions, cache)
        lean = LeanDecoder(model, caches[0], torch.arange(7, 20)[None].expand(2, -1), torch.float32)
        tok = prompt[:, -1]
        for step in range(10):
            want = model.lm_head(core(tok[:, None], None, torch.full((2, 1), 7 + step), caches[1])[0][:, -1])
            got = lean.step(tok, step, None)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
            tok = want.argmax(-1)


def test_fast_generate_sees_updated_weights():
    model = tiny()
    prompt = torch.randint(4, VOCAB, (1, 6))
    fast_generate(model, prompt, 8, eos_token_id=-1)  # builds the cached decode-layout weights
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(-3.0)
        model.lm_head.weight.add_(0.05 * torch.randn_like(model.lm_head.weight))
    hf = model.generate(prompt, max_new_tokens=24, min_new_tokens=24, do_sample=False)[:, 6:]
    assert torch.equal(fast_generate(model, prompt, 24, eos_token_id=-1), hf)


def test_bf16_linear_workaround_matches_autocast():
    """The fp32-GEMM route for bf16 autocast (used on CPUs without bf16 kernels) gives autocast's result."""
    from vlm.modeling_minimind import _Bf16LinearViaFp32

    torch.manual_seed(0)
    x = torch.randn(3, 5, 64, requires_grad=True)
    w = torch.randn(96, 64, requires_grad=True)
    g = torch.randn(3, 5, 96).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = torch.nn.functional.linear(x, w)
        ours = _Bf16LinearViaFp32.apply(x, w)
    assert ours.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), ref.float(), rtol=1e-2, atol=1e-2)
    ref_grads = torch.autograd.grad(ref, (x, w), g)
    our_grads = torch.autograd.grad(ours, (x, w), g)
    for a, b in zip(our_grads, ref_grads):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_rmsnorm_inference_shortcut_is_bit_identical():
    from vlm.modeling_minimind import RMSNorm

    norm = RMSNorm(96)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 11, 96) * 3
    with torch.no_grad():
        fast = norm(x)
    assert torch.equal(fast, norm(x).detach())


def test_packed_rows_train_exactly_like_padded_ones():
    """Packing (documents side by side, positions restarting) gives the same loss and gradients as
    right-padding: no token attends across a document border."""
    from data.collate import pack_collate, pad_collate
    from training.lm_stage import causal_lm_loss

    model = tiny(dropout=0.0).double()
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(3, VOCAB, (n,), generator=g) for n in (7, 12, 5, 9, 3)]
    items = [{"input_ids": d, "labels": d.clone()} for d in docs]
    losses, grads = [], []
    for batch in (pad_collate(items), pack_collate(items, max_len=20)):
        model.zero_grad()
        out = causal_lm_loss(model, batch)
        out.loss_sum.backward()
        losses.append((out.loss_sum.item(), out.count))
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert losses[0][1] == losses[1][1] == sum(len(it["input_ids"]) - 1 for it in items)
    assert abs(losses[0][0] - losses[1][0]) < 1e-9
    assert torch.allclose(grads[0], grads[1], atol=1e-10)


def test_lm_loss_on_supervised_positions_equals_full_logits_loss():
    """`causal_lm_loss` runs the LM head on supervised positions only; its loss and gradients equal
    the model's own full-logits `labels=` loss (HF mean over the same positions) when most labels
    are masked, as in SFT."""
    from training.lm_stage import causal_lm_loss

    model = tiny(dropout=0.0).double()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (3, 16), generator=g)
    labels = ids.clone()
    labels[:, :10] = -100  # the prompt
    labels[1, 12:] = -100
    batch = {"input_ids": ids, "labels": labels}
    results = []
    for full in (True, False):
        model.zero_grad()
        if full:
            loss = model(input_ids=ids, labels=labels).loss
        else:
            out = causal_lm_loss(model, batch)
            loss = out.loss_sum / out.count
            assert out.count == int((labels[:, 1:] != -100).sum())
        loss.backward()
        results.append((loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    assert abs(results[0][0] - results[1][0]) < 1e-12
    assert torch.allclose(results[0][1], results[1][1], atol=1e-12)


@pytest.mark.parametrize("moe", [False, True])
def test_last_layer_runs_only_where_the_loss_reads(moe):
    """`causal_lm_loss` passes the supervised positions as `keep`: the last layer's feed-forward sees
    only those rows (every row in a MoE model, whose balance loss counts all tokens), the first layer
    every row, and loss and gradients equal a full forward's."""
    from training.lm_stage import causal_lm_loss, supervised_head_loss

    model = tiny(moe=moe, dropout=0.0).double().train()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, VOCAB, (3, 16), generator=g)
    labels = ids.clone()
    labels[:, :10] = -100
    labels[1, 12:] = -100
    rows = {}

    def count_rows(i: int):
        def hook(module, args, output) -> None:
            rows[i] = args[0].numel() // args[0].shape[-1]
        return hook
    hooks = [model.model.layers[i].post_attention_layernorm.register_forward_hook(count_rows(i)) for i in (0, -1)]
    out = causal_lm_loss(model, {"input_ids": ids, "labels": labels})
    for h in hooks:
        h.remove()
    supervised = int((labels[:, 1:] != -100).sum())
    assert rows[0] == ids.numel() and rows[-1] == (ids.numel() if moe else supervised)
    out.loss_sum.backward()
    kept = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    hidden, _, aux = model.model(ids)
    full = supervised_head_loss(model, hidden, labels, aux)
    full.loss_sum.backward()
    assert abs(out.loss_sum.item() - full.loss_sum.item()) < 1e-10 and out.count == full.count == supervised
    for a, p in zip(kept, model.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-12)
