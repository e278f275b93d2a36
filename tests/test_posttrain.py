"""Post-training pieces: synthetic post-training data, rule rewards, GRPO maths, KD and tag-weighted losses."""
import json
import re

import pytest
import torch
import torch.nn.functional as F

from data.synth_posttrain import (SCALES, arithmetic, column_step, passage_fact, passage_options, question_kind,
                                  write_posttrain_splits)
from training.distill import kd_loss_terms, student_config
from training.distill_reason import make_weighted_loss
from training.grpo import group_advantages, grpo_objective
from training.rewards import answer_reward, extract_answer, follows_format, total_reward
from vlm import MiniMindConfig, MiniMindForCausalLM


def _rows(path):
    return [json.loads(l) for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    counts = write_posttrain_splits(root, seed=3, scale="micro")
    return root / "posttrain", counts


def test_posttrain_files_exist_are_bilingual_and_deterministic(splits, tmp_path):
    folder, counts = splits
    assert counts["lora_eval.jsonl"] == SCALES["micro"]["islands"] * 3 * 2  # 3 facts x 2 languages
    for name, n in counts.items():
        assert len(_rows(folder / name)) == n > 0, name
    langs = {r["lang"] for r in _rows(folder / "grpo_eval.jsonl")}
    assert langs == {"en", "zh"}
    write_posttrain_splits(tmp_path, seed=3, scale="micro")
    assert (tmp_path / "posttrain" / "reason_train.jsonl").read_bytes() == (folder / "reason_train.jsonl").read_bytes()


def test_heldout_questions_never_appear_in_training(splits):
    folder, _ = splits
    train_q = {r["conversations"][1]["content"] for r in _rows(folder / "reason_train.jsonl")}
    train_q |= {r["messages"][1]["content"] for r in _rows(folder / "grpo_train.jsonl")}
    for name in ("reason_eval.jsonl", "grpo_eval.jsonl"):
        assert not train_q & {r["messages"][1]["content"] for r in _rows(folder / name)}
    lora_train_q = {r["conversations"][1]["content"] for r in _rows(folder / "lora_train.jsonl")}
    lora_eval = _rows(folder / "lora_eval.jsonl")
    assert not lora_train_q & {r["messages"][1]["content"] for r in lora_eval}
    # ...but every held-out LoRA fact was taught (closed book: same island, same answer, other phrasing)
    taught = {(r["conversations"][1]["content"], r["conversations"][2]["content"]) for r in _rows(folder / "lora_train.jsonl")}
    taught_answers = {a for _, a in taught}
    assert all(r["answer"] in taught_answers for r in lora_eval)


def test_reasoning_traces_follow_the_format_and_are_correct(splits):
    folder, _ = splits
    for r in _rows(folder / "reason_train.jsonl"):
        text = r["conversations"][-1]["content"]
        assert follows_format(text), text
        q = r["conversations"][1]["content"]
        m = re.search(r"(\d+(?: [+-] \d+)+)", q)
        if m and "Passage" not in q and "短文" not in q:  # arithmetic: recompute without eval()
            toks = m.group(1).split()
            value = int(toks[0])
            for op, b in zip(toks[1::2], toks[2::2]):
                value = value + int(b) if op == "+" else value - int(b)
            assert extract_answer(text) == str(value)


def test_generators_answer_correctly():
    import random
    rng = random.Random(0)
    for _ in range(50):
        q, why, ans = arithmetic(rng, "en")
        assert why.endswith(f"so {ans}.") and int(ans) >= 0
        q, why, ans = passage_fact(rng, "zh")
        assert ans in q and ans in why


def test_question_kinds_and_passage_options_read_the_generated_questions():
    import random
    rng = random.Random(1)
    seen = set()
    for lang in ("en", "zh") * 40:
        q, why, ans = passage_fact(rng, lang)
        options = passage_options(q)
        kind = question_kind(q, "passage")
        seen.add(kind)
        assert len(options) == 3 and ans in options
        # the asked person's own sentence (quoted by the trace) holds the answer among the options
        assert (kind == "passage.place") == (not ans.isdigit())
        q, why, ans = arithmetic(rng, lang)
        assert question_kind(q, "arith") == f"arith.{why.count(', so ')}op"
    assert seen == {"passage.place", "passage.count"}
    with pytest.raises(ValueError, match="not a passage_fact question"):
        passage_options("What is 2 + 3?")


def _passage_item(people_values: list[str], asked: int) -> dict:
    towns = ["Hesk", "Velo", "Sarn"]
    passage = " ".join(f"{p} lives in {t} and keeps 3 hens." for p, t in zip(people_values, towns))
    return {"messages": [{"role": "user", "content": f"Passage: {passage}\nQuestion: Where does {people_values[asked]} live?"}],
            "answer": towns[asked], "kind": "passage"}


def test_headroom_tells_a_lookup_from_lucky_picks():
    from training.grpo_headroom import headroom_from_texts

    def say(x: str) -> str:
        return f"<think>...</think><answer>{x}</answer>"

    items = [_passage_item(["Mira", "Tova", "Oren"], 0), _passage_item(["Mira", "Tova", "Oren"], 2),
             {"messages": [{"role": "user", "content": "What is 8 + 7 - 3?"}], "answer": "12", "kind": "arith"}]
    greedy = [say("Hesk"), say("Velo"), say("11")]
    sampled = [say("Hesk"), say("Velo"), say("Sarn"),       # each option once: a guess's rate
               say("Hesk"), say("Velo"), say("Nowhere"),    # two options (both wrong), one non-option
               say("12"), say("13"), "12"]                  # one right; the unformatted "12" counts too
    r = headroom_from_texts(items, greedy, sampled, k=3)
    place, arith = r["kinds"]["passage.place"], r["kinds"]["arith.2op"]
    assert place["n"] == 2 and place["greedy"] == 0.5 and place["guess"] == pytest.approx(1 / 3)
    assert place["sampled"] == pytest.approx(1 / 6) and place["pass"] == 0.5
    assert place["sampled_given_option"] == pytest.approx(1 / 5)  # 1 right of the 5 answers naming a town
    assert place["no_lookup"] == 0.5  # the greedy rate beats the guess
    assert arith["greedy"] == 0.0 and arith["sampled"] == pytest.approx(2 / 3) and arith["pass"] == 1.0
    assert r["all"]["no_lookup"] == pytest.approx((2 * 0.5 + 1.0) / 3)
    assert r["reward_greedy"] == pytest.approx((0.8 * 1 + 0.2 * 3) / 3)
    assert r["reward_ceiling_no_lookup"] == pytest.approx(0.8 * 2 / 3 + 0.2)
    assert r["gain_ceiling_pts"]["pass_at_k"] == pytest.approx(100 * (0.8 * 2 / 3 + 0.2 - (0.8 + 0.6) / 3))
    with pytest.raises(ValueError, match="3 items need 3 greedy and 9 sampled"):
        headroom_from_texts(items, greedy, sampled[:-1], k=3)


def test_column_steps_hold_one_digit_facts_that_make_the_result():
    for a in range(0, 100):
        for op, bs in (("+", range(0, 100 - a)), ("-", range(0, a + 1))):
            for b in bs:
                head, work = column_step(a, op, b).split(": ")
                assert head == f"{a} {op} {b}"
                units, tens, result = work.rstrip(".").split(", ")
                for eq in (units, tens):  # "8 + 7 = 15", "1 + 1 + 1 = 3", "11 - 3 = 8", "3 - 2 - 1 = 0"
                    lhs, rhs = eq.split(" = ")
                    toks = lhs.split()
                    value = int(toks[0])
                    for o, x in zip(toks[1::2], toks[2::2]):
                        value = value + int(x) if o == "+" else value - int(x)
                    assert value == int(rhs) and 0 <= value < 20, (a, op, b, eq)
                assert units.split()[2] == str(b % 10) and tens.split()[0] == str(a // 10)
                exact = a + b if op == "+" else a - b
                assert result == f"so {exact}"
                assert int(tens.split(" = ")[1]) * 10 + int(units.split(" = ")[1]) % 10 == exact


def test_dpo_pairs_prefer_the_right_answer(splits):
    folder, _ = splits
    for r in _rows(folder / "dpo_train.jsonl"):
        assert r["chosen"][:-1] == r["rejected"][:-1]
        assert r["chosen"][-1]["content"] != r["rejected"][-1]["content"]


def test_rewards():
    good = "<think>3 + 4 = 7.</think><answer>7</answer>"
    assert follows_format(good) and answer_reward(good, "7") == 1.0 and total_reward(good, "7") == 1.0
    assert not follows_format("<think>x</think>7") and answer_reward("<think>x</think>7", "7") == 1.0
    assert not follows_format("<answer>7</answer><think>x</think>")
    assert not follows_format("<think>a<think>b</think><answer>7</answer>")
    assert total_reward("<think>x</think><answer>8</answer>", "7") == pytest.approx(0.2)
    assert answer_reward("Tolvan.", "tolvan") == 1.0 and answer_reward("托尔万。", "托尔万") == 1.0


def test_group_advantages_are_zero_mean_per_group():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5])
    a = group_advantages(r, group=4)
    assert a[:4].sum().abs() < 1e-5 and a[0] > 0 > a[1]
    assert torch.all(a[4:] == 0)  # a group where all responses tie teaches nothing


def test_grpo_objective_gradient_follows_the_advantage():
    logp = torch.tensor([[-1.0, -1.0], [-1.0, -1.0]], requires_grad=True)
    ref = logp.detach().clone()
    adv = torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 2)
    loss, kl = grpo_objective(logp, logp.detach(), ref, adv, mask, clip_eps=0.2, beta=0.1)
    assert torch.allclose(kl, torch.zeros(2))  # policy == reference
    assert torch.allclose(loss, -adv)  # ratio 1: loss = -A
    loss.sum().backward()
    assert torch.all(logp.grad[0] < 0) and torch.all(logp.grad[1] > 0)  # descent raises good, lowers bad
    # Clipping: once the ratio is past 1 + eps for a positive advantage, no more push.
    far = torch.tensor([[-0.5]], requires_grad=True)
    l2, _ = grpo_objective(far, torch.tensor([[-1.0]]), torch.tensor([[-0.5]]), torch.tensor([1.0]),
                           torch.ones(1, 1), clip_eps=0.2, beta=0.0)
    l2.sum().backward()
    assert far.grad.abs().item() == 0.0


def test_grpo_kl_is_bounded_for_tokens_the_policy_has_nearly_ruled_out():
    from training.grpo import KL_CAP
    # One ordinary token and one the policy gives 1e-9 where the reference gives 0.37: unbounded k3
    # would score that token e^20 and its gradient would swamp the batch.
    logp = torch.tensor([[-1.0, -20.7]], requires_grad=True)
    ref = torch.tensor([[-1.2, -1.0]])
    loss, kl = grpo_objective(logp, logp.detach(), ref, torch.zeros(1), torch.ones(1, 2), clip_eps=0.2, beta=1.0)
    d = torch.tensor(-0.2)
    assert torch.allclose(kl, ((torch.exp(d) - d - 1) + KL_CAP) / 2)
    loss.sum().backward()
    assert torch.isfinite(logp.grad).all() and logp.grad[0, 1] == 0 and logp.grad[0, 0] != 0


def test_kd_loss_terms():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    labels[0, :2] = -100
    keep = labels != -100
    ce_ref = F.cross_entropy(s[keep], labels[keep], reduction="sum")
    loss, ce, kl, n = kd_loss_terms(s, t, labels, alpha=1.0, temperature=2.0)
    assert n == 8 and torch.allclose(loss, ce_ref)
    loss0, _, kl0, _ = kd_loss_terms(s, s.clone(), labels, alpha=0.0, temperature=2.0)
    assert abs(kl0.item()) < 1e-5 and abs(loss0.item()) < 1e-4  # student == teacher: nothing to distil
    loss_half, _, kl, _ = kd_loss_terms(s, t, labels, alpha=0.5, temperature=2.0)
    want_kl = F.kl_div(F.log_softmax(s[keep] / 2, -1), F.log_softmax(t[keep] / 2, -1), log_target=True, reduction="sum")
    assert torch.allclose(kl, want_kl, atol=1e-5)
    assert torch.allclose(loss_half, 0.5 * ce_ref + 0.5 * 4 * want_kl, atol=1e-4)
    _, _, rkl, _ = kd_loss_terms(s, t, labels, alpha=0.5, temperature=1.0, reverse=True)
    want_rkl = F.kl_div(F.log_softmax(t[keep], -1), F.log_softmax(s[keep], -1), log_target=True, reduction="sum")
    assert torch.allclose(rkl, want_rkl, atol=1e-5) and not torch.allclose(rkl, kd_loss_terms(s, t, labels, 0.5, 1.0)[2])


def test_kd_loss_of_a_packed_batch_equals_the_padded_one():
    from data.collate import pack_collate, pad_collate
    from training.distill import make_kd_loss
    torch.manual_seed(0)
    cfg = dict(vocab_size=50, num_attention_heads=2, num_key_value_heads=1)
    teacher = MiniMindForCausalLM(MiniMindConfig(hidden_size=32, num_hidden_layers=2, **cfg)).eval()
    student = MiniMindForCausalLM(MiniMindConfig(hidden_size=16, num_hidden_layers=1, **cfg))
    g = torch.Generator().manual_seed(1)
    items = []
    for n in (7, 12, 5, 9):  # prompt tokens unsupervised, as SFT samples are
        ids = torch.randint(1, 50, (n,), generator=g)
        items.append({"input_ids": ids, "labels": torch.cat([torch.full((n // 2,), -100), ids[n // 2:]])})
    loss_fn = make_kd_loss(teacher, alpha=0.2, temperature=1.0)
    padded, packed = loss_fn(student, pad_collate(items)), loss_fn(student, pack_collate(items, max_len=20))
    assert packed.count == padded.count == sum(len(it["input_ids"]) - len(it["input_ids"]) // 2 for it in items)
    assert torch.allclose(packed.loss_sum, padded.loss_sum, atol=1e-4) and padded.loss_sum > 0
    assert packed.metrics["kl"] == pytest.approx(padded.metrics["kl"], abs=1e-5) and padded.metrics["kl"] > 0


def test_student_is_at_most_a_quarter_of_the_teacher():
    teacher_cfg = MiniMindConfig(vocab_size=2048, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=256)
    count = lambda m: sum(p.numel() for p in {id(p): p for p in m.parameters()}.values())
    ratio = count(MiniMindForCausalLM(student_config(teacher_cfg, 0.5))) / count(MiniMindForCausalLM(teacher_cfg))
    assert ratio <= 0.25, ratio
    deeper = student_config(teacher_cfg, 0.5, layers=3)  # the tiny preset's student: 3 layers of width 128
    assert (deeper.num_hidden_layers, deeper.hidden_size) == (3, 128)
    assert count(MiniMindForCausalLM(deeper)) / count(MiniMindForCausalLM(teacher_cfg)) <= 0.25
    for scale in (0.55, 0.6, 0.65, 0.7):  # 0.65 of 256 is 166 = 2 heads of 83: RoPE needs an even head size
        cfg = student_config(teacher_cfg, scale)
        assert (cfg.hidden_size // cfg.num_attention_heads) % 2 == 0 and cfg.hidden_size <= 256 * scale
        MiniMindForCausalLM(cfg)


def test_tag_weighted_loss():
    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig(vocab_size=40, hidden_size=32, num_hidden_layers=1,
                                               num_attention_heads=2, num_key_value_heads=1))
    ids = torch.randint(4, 40, (2, 10))
    labels = ids.clone()
    labels[:, :3] = -100
    tags = torch.tensor([int(ids[0, 5]), int(ids[1, 7])])
    batch = {"input_ids": ids, "labels": labels}
    plain = make_weighted_loss(tags, 1.0)(model, batch)
    heavy = make_weighted_loss(tags, 5.0)(model, batch)
    ce = F.cross_entropy(model(input_ids=ids).logits[:, :-1].reshape(-1, 40), labels[:, 1:].reshape(-1),
                         ignore_index=-100, reduction="sum")
    assert plain.count == heavy.count == 14
    assert torch.allclose(plain.loss_sum, ce, atol=1e-4) and heavy.loss_sum > plain.loss_sum


def test_grpo_num_iterations_reuses_each_rollout_with_the_ratio_to_its_sampling_policy(tmp_path, monkeypatch):
    import training.grpo as grpo
    from training.train_tokenizer import train_tokenizer
    from vlm.tokenizer import load_tokenizer

    train_tokenizer(["<think>3 + 4 = 7.</think><answer>7</answer> What is 3 + 4?"] * 20, tmp_path, vocab_size=280)
    tok = load_tokenizer(tmp_path)
    torch.manual_seed(0)
    cfg = MiniMindConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=64)
    policy, ref = MiniMindForCausalLM(cfg), MiniMindForCausalLM(cfg)
    ref.load_state_dict(policy.state_dict())
    opt = torch.optim.SGD(policy.parameters(), lr=0.5)
    # A random model is never right: reward odd-length answers instead, so that advantages are not all zero.
    monkeypatch.setattr(grpo, "answer_reward", lambda text, answer: float(len(text) % 2))
    sampled_prompts = []
    real_generate = grpo.fast_generate
    monkeypatch.setattr(grpo, "fast_generate", lambda m, ids, *a, **k: sampled_prompts.append(ids) or real_generate(m, ids, *a, **k))
    batches = [{"prompt_ids": [tok("What is 3 + 4?").input_ids], "answers": ["7"]},
               {"prompt_ids": [tok("4 + 4").input_ids], "answers": ["8"]}]
    loss_fn = grpo.make_grpo_loss(ref, tok, group=8, max_new_tokens=6, temperature=1.0, clip_eps=10.0, beta=0.0,
                                  format_weight=0.2, seed=0, num_iterations=2)
    losses = []
    for batch in batches * 2:  # rollouts at steps 1 and 3, of the batch each of them is handed
        out = loss_fn(policy, batch)
        opt.zero_grad()
        out.loss_sum.backward()
        opt.step()
        losses.append(out.loss_sum.item())
    assert len(sampled_prompts) == 2 and all(p.shape[1] == len(batches[0]["prompt_ids"][0]) for p in sampled_prompts)
    # Sampling policy == policy: ratio 1, and the zero-mean advantages cancel; one update later they do not.
    assert abs(losses[0]) < 1e-6 and abs(losses[2]) < 1e-6
    assert abs(losses[1]) > 1e-4
    with pytest.raises(ValueError, match="num_iterations"):
        grpo.make_grpo_loss(ref, tok, 4, 6, 1.0, 0.2, 0.0, 0.2, num_iterations=0)
