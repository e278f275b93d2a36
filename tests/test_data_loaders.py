"""data/: streaming jsonl index, malformed-record errors, datasets, SFT loss mask (golden dump), collation."""
import json
import logging
import random

import pytest
import torch

import data.jsonl as jsonl_mod
from data.collate import pack_collate, pad_collate
from data.datasets import DPODataset, PretrainDataset, SFTDataset, encode_conversation
from data.jsonl import DataError, JsonlFile, index_lines
from training.train_tokenizer import train_tokenizer
from vlm.tokenizer import BOS_ID, EOS_ID, EOS_TOKEN, load_tokenizer, render_chat

CORPUS = [
    "Kelxi was born in Merro. Kelxi works as a baker. The passage does not say.",
    "科巴赞出生在梅罗。科巴赞是一名歌手。文中没有提到。",
    "Where was Kelxi born? What is Kelxi's job? Be brief. Hello world.",
    "system user assistant tool",
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    train_tokenizer(CORPUS * 20, d, vocab_size=300)
    return load_tokenizer(d)


@pytest.fixture(scope="module")
def tok_pad_is_eos(tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("tok_pad_eos")
    tok.save_pretrained(d)
    t = load_tokenizer(d)
    t.pad_token = EOS_TOKEN  # the configuration that breaks value-based masks (pad == eos)
    assert t.pad_token_id == EOS_ID
    return t


def write_jsonl(path, lines):
    path.write_text("".join(l + "\n" for l in lines), encoding="utf-8")
    return path


# ---------------------------------------------------------------- golden SFT mask

SYSTEM_CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Where was Kelxi born?"},
    {"role": "assistant", "content": "Merro"},
    {"role": "user", "content": "科巴赞是做什么工作的？"},
    {"role": "assistant", "content": "歌手"},
]
# The hand-built dump: the rendered conversation cut into pieces, each marked supervised or not.
# Only assistant contents (with the space before them) and their closing <|im_end|> are learned; headers, the "\n" after a header
# and the "\n" after <|im_end|>, system and user turns are not.
GOLDEN = [
    ("<|im_start|>", False), ("system", False), ("\n", False), (" Be brief.", False), ("<|im_end|>", False), ("\n", False),
    ("<|im_start|>", False), ("user", False), ("\n", False), (" Where was Kelxi born?", False), ("<|im_end|>", False),
    ("\n", False),
    ("<|im_start|>", False), ("assistant", False), ("\n", False), (" Merro", True), ("<|im_end|>", True), ("\n", False),
    ("<|im_start|>", False), ("user", False), ("\n", False), (" 科巴赞是做什么工作的？", False), ("<|im_end|>", False),
    ("\n", False),
    ("<|im_start|>", False), ("assistant", False), ("\n", False), (" 歌手", True), ("<|im_end|>", True), ("\n", False),
]


def golden_tokens(tok):
    ids, labels = [], []
    for piece, learn in GOLDEN:
        p = tok(piece, add_special_tokens=False)["input_ids"]
        ids += p
        labels += p if learn else [-100] * len(p)
    return ids, labels


def test_golden_dump_is_the_chat_template(tok):
    assert "".join(p for p, _ in GOLDEN) == render_chat(SYSTEM_CONV)
    assert tok.apply_chat_template(SYSTEM_CONV, tokenize=False) == render_chat(SYSTEM_CONV)


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_sft_labels_match_golden_dump(tok, tok_pad_is_eos, pad_is_eos):
    t = tok_pad_is_eos if pad_is_eos else tok
    ids, labels = golden_tokens(t)
    enc = encode_conversation(t, SYSTEM_CONV, max_len=512)
    assert enc["input_ids"].tolist() == ids
    assert enc["labels"].tolist() == labels
    sup = [i for i, l in enumerate(labels) if l != -100]
    # Two answers, each followed by its end token, and nothing else.
    assert [labels[i] for i in sup].count(EOS_ID) == 2
    # each answer with the space the template puts before it (decode drops only the very first one)
    assert t.decode([labels[i] for i in sup]) == "Merro<|im_end|> 歌手<|im_end|>"
    first = ids.index(EOS_ID)
    assert all(labels[i] == -100 for i in range(first + 1))  # system turn, including its end token


def test_pad_equal_to_eos_keeps_end_tokens_supervised(tok, tok_pad_is_eos, tmp_path):
    convs = [SYSTEM_CONV, SYSTEM_CONV[1:3]]
    path = write_jsonl(tmp_path / "sft.jsonl", [json.dumps({"conversations": c}, ensure_ascii=False) for c in convs])
    ref = pad_collate([SFTDataset(path, tok, 512)[i] for i in range(2)], pad_id=tok.pad_token_id)
    ds = SFTDataset(path, tok_pad_is_eos, 512)
    batch = pad_collate([ds[0], ds[1]], pad_id=tok_pad_is_eos.pad_token_id)
    assert torch.equal(batch["labels"], ref["labels"]) and torch.equal(batch["attention_mask"], ref["attention_mask"])
    short = batch["attention_mask"][1] == 0
    assert short.any() and (batch["input_ids"][1][short] == EOS_ID).all()  # padded with the end id...
    assert (batch["labels"][1][short] == -100).all()  # ...which is never learned
    assert int((batch["labels"][0] == EOS_ID).sum()) == 2 and int((batch["labels"][1] == EOS_ID).sum()) == 1


def test_tool_turns_and_multi_turn_are_masked(tok):
    conv = [{"role": "user", "content": "Hello world."}, {"role": "assistant", "content": "<tool_call>x</tool_call>"},
            {"role": "tool", "content": "Merro"}, {"role": "assistant", "content": "Merro"}]
    enc = encode_conversation(tok, conv, 512)
    sup = [t for t in enc["labels"].tolist() if t != -100]
    assert tok.decode(sup) == "<tool_call>x</tool_call><|im_end|> Merro<|im_end|>"


def test_truncation_keeps_a_supervised_answer(tok):
    long_user = "Where was Kelxi born? " * 60
    conv = [{"role": "user", "content": long_user}, {"role": "assistant", "content": "Merro"}]
    enc = encode_conversation(tok, conv, max_len=32)
    ids, labels = enc["input_ids"].tolist(), enc["labels"].tolist()
    assert len(ids) == 32
    # The window slid to end at the answer's end token: the answer and its closest context survive.
    assert labels[-1] == EOS_ID and tok.decode([l for l in labels if l != -100]) == "Merro<|im_end|>"
    # When an answer fits, the conversation is cut from the right as usual (the start stays).
    ids, labels = golden_tokens(tok)
    n = next(i for i, l in enumerate(labels) if l != -100) + 2
    short = encode_conversation(tok, SYSTEM_CONV, max_len=n)
    assert short["input_ids"].tolist() == ids[:n] and short["labels"].tolist() == labels[:n]


# ---------------------------------------------------------------- datasets and collation

def test_pretrain_item(tok, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [json.dumps({"text": "Kelxi was born in Merro."}), "",
                                              json.dumps({"text": "Hello world. " * 50})])
    ds = PretrainDataset(path, tok, max_len=16)
    assert len(ds) == 2
    a = ds[0]
    assert a["input_ids"][0] == BOS_ID and a["input_ids"][-1] == EOS_ID
    assert torch.equal(a["input_ids"], a["labels"])
    assert tok.decode(a["input_ids"][1:-1]) == "Kelxi was born in Merro."
    assert len(ds[1]["input_ids"]) == 16
    assert torch.equal(ds[0]["input_ids"], ds[0]["input_ids"])  # deterministic


def test_pad_collate_shapes_and_masks(tok, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [json.dumps({"text": t}) for t in ("Hello", "Hello world. Be brief.")])
    ds = PretrainDataset(path, tok, 64)
    b = pad_collate([ds[0], ds[1]])
    n0 = len(ds[0]["input_ids"])
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape
    assert b["attention_mask"][0].tolist() == [1] * n0 + [0] * (b["input_ids"].shape[1] - n0)
    assert (b["labels"][0, n0:] == -100).all() and (b["input_ids"][0, n0:] == 0).all()


def test_dpo_dataset_and_collate(tok, tmp_path):
    prompt = [{"role": "user", "content": "Where was Kelxi born?"}]
    rec = {"chosen": prompt + [{"role": "assistant", "content": "Merro"}],
           "rejected": prompt + [{"role": "assistant", "content": "Hello world. Hello world."}]}
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps(rec)] * 2)
    ds = DPODataset(path, tok, 128)
    item = ds[0]
    assert set(item) == {"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"}
    assert tok.decode([t for t in item["chosen_labels"].tolist() if t != -100]) == "Merro<|im_end|>"
    b = pad_collate([ds[0], ds[1]])
    for side in ("chosen", "rejected"):
        assert b[f"{side}_attention_mask"].shape == b[f"{side}_input_ids"].shape == b[f"{side}_labels"].shape


def test_pack_collate_keeps_documents_whole_and_apart(tok, tmp_path):
    texts = ["Hello world.", "Kelxi was born in Merro. " * 3, "Be brief.", "科巴赞是一名歌手。"]
    path = write_jsonl(tmp_path / "p.jsonl", [json.dumps({"text": t}, ensure_ascii=False) for t in texts])
    items = [PretrainDataset(path, tok, 256)[i] for i in range(4)]
    lengths = [len(it["input_ids"]) for it in items]
    max_len = max(lengths) + 2
    b = pack_collate(items, max_len=max_len)
    assert b["input_ids"].shape[1] <= max_len and b["input_ids"].shape[0] < len(items)
    assert int(b["attention_mask"].sum()) == sum(lengths)
    # every document is found whole in one row, its positions counting from 0, its first label dropped
    rows = b["input_ids"].tolist()
    for it in items:
        doc = it["input_ids"].tolist()
        hits = [(r, i) for r, row in enumerate(rows) for i in range(len(row) - len(doc) + 1) if row[i:i + len(doc)] == doc]
        r, i = hits[0]
        assert b["position_ids"][r, i:i + len(doc)].tolist() == list(range(len(doc)))
        assert b["labels"][r, i] == -100 and b["labels"][r, i + 1:i + len(doc)].tolist() == doc[1:]
    assert int((b["labels"] != -100).sum()) == sum(lengths) - len(items)
    with pytest.raises(ValueError, match="does not fit"):
        pack_collate(items, max_len=min(lengths) - 1)
    # narrow rows: as wide as the longest document, more of them, the same tokens and targets
    narrow = pack_collate(items, max_len=256, row_len=1)
    assert narrow["input_ids"].shape[1] == max(lengths) and narrow["input_ids"].shape[0] > b["input_ids"].shape[0]
    assert sorted(narrow["labels"][narrow["labels"] != -100].tolist()) == sorted(b["labels"][b["labels"] != -100].tolist())


# ---------------------------------------------------------------- jsonl index and errors

def test_index_matches_naive_split_across_chunk_boundaries(tmp_path, monkeypatch):
    rng = random.Random(0)
    lines = []
    for i in range(300):
        r = rng.random()
        lines.append("" if r < 0.1 else "   \t" if r < 0.15 else json.dumps({"text": "字" * rng.randint(0, 30), "i": i},
                                                                           ensure_ascii=False))
    raw = "\r\n".join(lines[:150]) + "\n" + "\n".join(lines[150:])  # CRLF and LF, no trailing newline
    path = tmp_path / "x.jsonl"
    path.write_bytes(raw.encode("utf-8"))
    expected = [(n, l) for n, l in enumerate(raw.split("\n"), 1) if l.strip()]
    for chunk in (1, 7, 64, 1 << 20):  # boundaries inside lines, on newlines, and no boundary at all
        monkeypatch.setattr(jsonl_mod, "CHUNK_BYTES", chunk)
        offsets, linenos = index_lines(path)
        assert linenos.tolist() == [n for n, _ in expected]
        f = JsonlFile(path)
        assert len(f) == len(expected)
        for k in rng.sample(range(len(f)), 40):
            assert f[k] == json.loads(expected[k][1])
            assert f.line_number(k) == expected[k][0]
    assert f[-1] == json.loads(expected[-1][1])
    with pytest.raises(IndexError):
        f[len(f)]


def test_empty_file_has_no_records(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_text("\n \n")
    assert len(JsonlFile(path)) == 0


def test_malformed_record_names_file_and_line(tok, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [json.dumps({"text": "Hello"}), "", '{"text": "Hel', json.dumps({"txt": 1}),
                                                json.dumps([1, 2]), json.dumps({"text": 5})])
    ds = PretrainDataset(path, tok, 32)
    assert len(ds) == 5
    ds[0]
    with pytest.raises(DataError, match=rf"bad\.jsonl:3: bad JSON"):
        ds[1]
    with pytest.raises(DataError, match=rf"{path}:4: missing field 'text'"):
        ds[2]
    with pytest.raises(DataError, match=r"bad\.jsonl:5: expected a JSON object"):
        ds[3]
    with pytest.raises(DataError, match=r"bad\.jsonl:6: field 'text' must be a string"):
        ds[4]


def test_sft_and_dpo_field_errors(tok, tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", [
        json.dumps({"conversations": [{"role": "user", "content": "hi"}]}),
        json.dumps({"conversations": [{"role": "wizard", "content": "hi"}]}),
        json.dumps({"conversations": [{"role": "assistant"}]}),
    ])
    ds = SFTDataset(path, tok, 32)
    with pytest.raises(DataError, match=r"s\.jsonl:1: .*no assistant turn"):
        ds[0]
    with pytest.raises(DataError, match=r"s\.jsonl:2: .*unknown or missing role 'wizard'"):
        ds[1]
    with pytest.raises(DataError, match=r"s\.jsonl:3: .*missing field 'content'"):
        ds[2]
    dpath = write_jsonl(tmp_path / "d.jsonl", [json.dumps({"chosen": [{"role": "assistant", "content": "x"}]})])
    with pytest.raises(DataError, match=r"d\.jsonl:1: missing field 'rejected'"):
        DPODataset(dpath, tok, 32)[0]


def test_skip_bad_counts_and_reports(tok, tmp_path, caplog):
    good = [json.dumps({"text": f"Hello {i}"}) for i in range(5)]
    path = write_jsonl(tmp_path / "mixed.jsonl", [good[0], "{oops", good[1], good[2], json.dumps({"x": 1}), "",
                                                  good[3], "\xff not json", good[4]])
    with caplog.at_level(logging.WARNING, logger="data.jsonl"):
        ds = PretrainDataset(path, tok, 32, skip_bad=True)
    assert len(ds) == 5 and ds.n_skipped == 3
    assert [tok.decode(ds[i]["input_ids"][1:-1]) for i in range(5)] == [f"Hello {i}" for i in range(5)]
    assert "skipped 3 malformed" in caplog.text and "mixed.jsonl:2" in caplog.text
    assert ds.file.skipped[0].startswith(f"{path}:2: bad JSON")
    assert "mixed.jsonl:5: missing field 'text'" in ds.file.skipped[1]


def test_all_bad_file_is_an_error(tok, tmp_path):
    path = write_jsonl(tmp_path / "allbad.jsonl", ["nope", "{"])
    with pytest.raises(DataError, match="no usable records"):
        PretrainDataset(path, tok, 32, skip_bad=True)


def test_dataloader_with_workers(tok, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [json.dumps({"text": f"Hello world {i}"}) for i in range(8)])
    ds = PretrainDataset(path, tok, 32)
    ds[0]  # opens a handle in the parent; workers must reopen their own
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=pad_collate, num_workers=2)
    rows = [tok.decode(r[m.bool()][1:-1]) for b in loader for r, m in zip(b["input_ids"], b["attention_mask"])]
    assert rows == [f"Hello world {i}" for i in range(8)]
