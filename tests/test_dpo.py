"""DPO (training/dpo.py): the loss at the start, the cached reference, and that training learns the preference."""
import copy
import json
import math

import pytest
import torch

from data.synth_posttrain import write_posttrain_splits
from training.dpo import (PreferenceDataset, attach_reference, dpo_loss, make_dpo_loss, pair_collate, pair_logps,
                          preference_metrics, sequence_logps)
from training.train_tokenizer import iter_texts, train_tokenizer
from vlm import MiniMindConfig, MiniMindForCausalLM
from vlm.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    write_posttrain_splits(root, seed=0, scale="micro")
    train_tokenizer(iter_texts(sorted((root / "posttrain").glob("*.jsonl"))), root / "tokenizer", vocab_size=400)
    return root, load_tokenizer(root / "tokenizer")


def small_model(vocab: int, seed: int = 0) -> MiniMindForCausalLM:
    torch.manual_seed(seed)
    return MiniMindForCausalLM(MiniMindConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=1,
                                              num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256))


def test_dpo_loss_is_ln2_when_policy_equals_reference(world):
    root, tok = world
    ref = small_model(len(tok)).eval()
    policy = copy.deepcopy(ref).train()
    data = attach_reference(PreferenceDataset(root / "posttrain" / "dpo_train.jsonl", tok, 192), ref)
    batch = pair_collate([data[i] for i in range(8)])
    for smoothing in (0.0, 0.1):
        out = make_dpo_loss(beta=0.1, label_smoothing=smoothing)(policy, batch)
        assert out.count == 8
        assert abs(out.loss_sum.item() / out.count - math.log(2)) < 1e-5
        assert out.metrics["reward_margin"] == pytest.approx(0.0, abs=1e-5)


def test_rpo_term_adds_the_chosen_answers_mean_nll(world):
    root, tok = world
    ref = small_model(len(tok)).eval()
    policy = small_model(len(tok), seed=1).train()
    data = attach_reference(PreferenceDataset(root / "posttrain" / "dpo_train.jsonl", tok, 192), ref)
    batch = pair_collate([data[i] for i in range(4)])
    plain = make_dpo_loss(beta=0.1)(policy, batch)
    mixed = make_dpo_loss(beta=0.1, rpo_alpha=0.5)(policy, batch)
    chosen = batch["labels"][:4]
    with torch.no_grad():
        logits = policy(input_ids=batch["input_ids"][:4], attention_mask=batch["attention_mask"][:4]).logits
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), chosen[:, 1:], ignore_index=-100,
                                                reduction="none").sum(-1) / (chosen[:, 1:] != -100).sum(-1)
    assert mixed.loss_sum.item() == pytest.approx(plain.loss_sum.item() + 0.5 * nll.sum().item(), rel=1e-5)
    assert mixed.metrics["chosen_nll"] == pytest.approx(nll.mean().item(), rel=1e-5)


def test_dpo_loss_direction_and_rewards():
    pc, pr = torch.tensor([-1.0, -5.0]), torch.tensor([-5.0, -1.0])
    ref = torch.tensor([-3.0, -3.0])
    losses, rc, rr = dpo_loss(pc, pr, ref, ref, beta=0.5)
    assert losses[0] < math.log(2) < losses[1]  # preferring chosen lowers the loss
    torch.testing.assert_close(rc, torch.tensor([1.0, -1.0]))
    torch.testing.assert_close(rr, torch.tensor([-1.0, 1.0]))


def test_pairs_are_masked_to_the_response_and_batched_chosen_first(world):
    root, tok = world
    data = PreferenceDataset(root / "posttrain" / "dpo_train.jsonl", tok, 192)
    batch = pair_collate([data[0], data[1]])
    assert batch["input_ids"].shape[0] == 4 and batch["n_pairs"] == 2
    for row in range(4):
        supervised = batch["labels"][row][batch["labels"][row] != -100]
        assert 0 < len(supervised) < int(batch["attention_mask"][row].sum())  # prompt tokens are not scored
    # chosen and rejected share the prompt: the first supervised position is the same in both
    first = lambda r: int((batch["labels"][r] != -100).nonzero()[0])
    assert first(0) == first(2) and first(1) == first(3)


def test_sequence_logps_matches_a_token_by_token_sum():
    model = small_model(50).eval()
    ids = torch.randint(4, 50, (1, 9), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :5] = -100
    with torch.no_grad():
        got = sequence_logps(model, ids, None, labels)
        logp = model(input_ids=ids).logits.log_softmax(-1)
        want = sum(logp[0, t - 1, ids[0, t]] for t in range(5, 9))
    assert got.item() == pytest.approx(want.item(), abs=1e-4)


def test_training_the_policy_learns_the_preference_on_heldout_pairs(world):
    """Plain optimizer steps on the DPO loss from a random model: the implicit reward learns what a
    model this small can learn without knowing any facts (runaway repetition is worse), on pairs it
    never saw; wrong-fact pairs need the knowledge an SFT model brings (measured in the pipeline)."""
    root, tok = world
    ref = small_model(len(tok)).eval()
    policy = copy.deepcopy(ref).train()
    train = attach_reference(PreferenceDataset(root / "posttrain" / "dpo_train.jsonl", tok, 192), ref)
    held_path = root / "posttrain" / "dpo_eval.jsonl"
    held = PreferenceDataset(held_path, tok, 192)
    rows = [json.loads(l) for l in held_path.read_text(encoding="utf-8").splitlines() if l.strip()]
    looping = torch.tensor([r["rejected"][-1]["content"].count(r["chosen"][-1]["content"]) >= 4 for r in rows])
    assert 0 < int(looping.sum()) < len(rows)
    loss_fn = make_dpo_loss(beta=0.1)
    opt = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        idx = torch.randint(len(train), (16,), generator=g).tolist()
        out = loss_fn(policy, pair_collate([train[i] for i in idx]))
        (out.loss_sum / out.count).backward()
        opt.step()
        opt.zero_grad()
    ref_lp, pol_lp = pair_logps(ref, held), pair_logps(policy, held)
    before = preference_metrics(ref_lp, ref_lp, beta=0.1)
    after = preference_metrics(pol_lp, ref_lp, beta=0.1)
    assert before["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert after["loss"] < before["loss"], after
    on_loops = preference_metrics(pol_lp[looping], ref_lp[looping], beta=0.1)
    assert on_loops["pref_acc"] >= 0.9, on_loops


def test_likelihood_accuracy_ranks_the_policy_itself_while_pref_acc_ranks_its_change():
    ref = torch.tensor([[-1.0, -3.0], [-2.0, -1.0], [-5.0, -4.0]])
    policy = torch.tensor([[-1.0, -3.0], [-1.5, -1.2], [-4.0, -4.5]])  # 1: unchanged; 2, 3: chosen pushed up
    m = preference_metrics(policy, ref, beta=0.1)
    assert m["likelihood_acc"] == pytest.approx(2 / 3)  # rows 1 and 3 rank chosen higher
    assert m["pref_acc"] == pytest.approx(2 / 3)  # rows 2 and 3 gained; row 1 has a zero margin
    assert preference_metrics(ref, ref, beta=0.1)["pref_acc"] == 0.0


def test_trainable_pattern_trains_only_the_matching_parameters(world, tmp_path):
    """`--trainable REGEX`: the final norm's gains move, every other weight is bit-identical to the init."""
    import shutil

    from safetensors.torch import load_file

    from training.dpo import main

    root, tok = world
    init = tmp_path / "init"
    small_model(len(tok)).save_pretrained(init)
    for f in (root / "tokenizer").iterdir():
        shutil.copy(f, init / f.name)
    out = tmp_path / "dpo"
    main(["--data", str(root / "posttrain" / "dpo_train.jsonl"), "--init", str(init), "--out", str(out),
          "--preset", "micro", "--max-steps", "3", "--lr", "1e-2", "--trainable", r"^model\.norm\.", "--no-progress"])
    before, after = load_file(init / "model.safetensors"), load_file(out / "model.safetensors")
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == ["model.norm.weight"], changed
    with pytest.raises(ValueError, match="no trainable parameters"):
        main(["--data", str(root / "posttrain" / "dpo_train.jsonl"), "--init", str(init), "--out", str(tmp_path / "x"),
              "--preset", "micro", "--max-steps", "1", "--trainable", "no_such_parameter", "--no-progress"])
