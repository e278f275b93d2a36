"""Tokenizer training, special ids, chat template and the image placeholder."""
import json

import pytest
from transformers import AutoTokenizer

from training.train_tokenizer import main as train_main
from vlm.tokenizer import BOS_ID, EOS_ID, IMAGE_ID, IMAGE_TOKEN, PAD_ID, load_tokenizer, render_chat

TEXTS = ["The blue fox lives in Amber Town.", "蓝色的狐狸住在琥珀镇。", "email me @ home, 12 + 30 = 42"] * 30


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    data = root / "pretrain.jsonl"
    data.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in TEXTS), encoding="utf-8")
    sft = root / "sft.jsonl"
    sft.write_text(json.dumps({"conversations": [{"role": "user", "content": "hi"},
                                                 {"role": "assistant", "content": "hello"}]}) + "\n")
    train_main(["--data", str(root), "--out", str(root / "tok"), "--vocab-size", "400"])
    return root / "tok"


def test_loads_with_autotokenizer_and_special_ids(tok_dir):
    tok = AutoTokenizer.from_pretrained(tok_dir)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (PAD_ID, BOS_ID, EOS_ID)
    assert tok.convert_tokens_to_ids(IMAGE_TOKEN) == IMAGE_ID
    assert len(tok) <= 400 + 8  # vocab incl. the structural tag tokens
    text = "蓝色的狐狸 and the blue fox 42"
    assert tok.decode(tok(text).input_ids) == text  # byte-level: lossless round trip


def test_chat_template_equals_python_renderer(tok_dir):
    tok = load_tokenizer(tok_dir)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where?"},
            {"role": "assistant", "content": "Amber Town."}, {"role": "tool", "content": "{}"}]
    for gen in (False, True):
        assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen) == render_chat(msgs, gen)
    with pytest.raises(ValueError, match="unknown role"):
        render_chat([{"role": "robot", "content": "x"}])


def test_literal_at_sign_is_not_an_image_slot(tok_dir):
    tok = load_tokenizer(tok_dir)
    ids = tok("mail @ home @@@").input_ids
    assert IMAGE_ID not in ids
    slots = tok(IMAGE_TOKEN * 5).input_ids
    assert slots == [IMAGE_ID] * 5  # a run of N placeholders is exactly N ids


def test_digits_are_single_tokens(tok_dir):
    tok = load_tokenizer(tok_dir)
    assert tok.convert_ids_to_tokens(tok("2026").input_ids) == ["2", "0", "2", "6"]


def test_a_word_has_the_same_ids_wherever_it_stands(tok_dir):
    """What a model reads in a sentence and writes as an answer must be the same ids: " Amber" in a
    sentence and the answer "Amber" after the chat header; a Han character never fuses with its
    neighbours (so the town in "住在琥珀镇" is the same ids as the answer "琥珀镇"); decoding the
    answer's ids gives the answer without the space that the template put before it."""
    tok = load_tokenizer(tok_dir)
    ids = lambda text: tok(text, add_special_tokens=False).input_ids
    amber = ids(" Amber")
    assert ids("lives in Amber")[-len(amber):] == amber
    answer = ids(render_chat([{"role": "assistant", "content": "Amber"}]))
    assert answer[-len(amber) - 2:-2] == amber
    assert tok.decode(amber) == "Amber"
    sentence, town = ids("蓝色的狐狸住在琥珀镇。"), ids("琥珀镇")
    assert any(sentence[i:i + len(town)] == town for i in range(len(sentence)))
    assert len(town) == 3  # one id per character (each one is in the training text)


def test_per_file_cap_reads_the_head_of_every_file(tmp_path):
    """`max_chars_per_file` stops inside a long file and still reads the next one (a global cap
    would never reach it); a malformed later line of a capped file is never read."""
    from training.train_tokenizer import iter_texts

    long, short = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    long.write_text("".join(json.dumps({"text": f"doc{i:03d}"}) + "\n" for i in range(100)) + "not json\n")
    short.write_text(json.dumps({"conversations": [{"role": "user", "content": "hi"},
                                                    {"role": "assistant", "content": "yo"}]}) + "\n")
    texts = list(iter_texts([long, short], max_chars_per_file=20))
    assert texts == ["doc000", "doc001", "doc002", "doc003", "hi", "yo"]
    assert list(iter_texts([long, short], max_chars=20))[-1] == "doc003"
