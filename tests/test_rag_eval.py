"""Retrieval metrics follow trec_eval; `python -m rag.eval` runs end to end on BEIR and CMRC layouts."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from rag.eval import load_beir, main, metrics

SHARED = Path(__file__).resolve().parents[2] / "shared"


def test_metrics_definitions():
    m = metrics(["a", "x", "b"], {"a": 2, "b": 1, "c": 3})
    dcg = 2 + 1 / math.log2(4)
    idcg = 3 + 2 / math.log2(3) + 1 / math.log2(4)  # ideal ranking from all judged documents
    assert m["ndcg@10"] == pytest.approx(dcg / idcg)
    exp_dcg, exp_idcg = 3 + 1 / math.log2(4), 7 + 3 / math.log2(3) + 1 / math.log2(4)
    assert m["ndcg@10_exp"] == pytest.approx(exp_dcg / exp_idcg)
    assert m["mrr@10"] == 1.0 and m["recall@10"] == pytest.approx(2 / 3)
    assert metrics(["x", "y", "a"], {"a": 1})["mrr@10"] == pytest.approx(1 / 3)
    miss = metrics(["x"] * 10 + ["a"], {"a": 1})
    assert miss["ndcg@10"] == 0 and miss["hit@10"] == 0


def test_eval_cli_on_tiny_beir_and_cmrc(tmp_path, capsys):
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    docs = {"d1": "solar panels make electricity", "d2": "green tea comes from china", "d3": "the nile river"}
    (beir / "corpus.jsonl").write_text("".join(json.dumps({"_id": k, "title": "", "text": v}) + "\n"
                                               for k, v in docs.items()))
    (beir / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "solar electricity"}) + "\n"
                                        + json.dumps({"_id": "q2", "text": "tea"}) + "\n")
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t2\nq2\tmissing\t1\n")
    assert load_beir(beir)[2] == {"q1": {"d1": 1}, "q2": {"d2": 2}}
    out = main(["--beir", str(beir), "--sweep"])
    for mode in ("bm25", "dense", "hybrid"):
        assert out[mode]["ndcg@10"] == 1.0 and out[mode]["queries"] == 2 and out[mode]["p95_ms"] >= 0
    assert len(out["sweep_ndcg@10_linear_exp"]) == 11
    cmrc = tmp_path / "c.json"
    cmrc.write_text(json.dumps([
        {"context_id": "C1", "context_text": "熊猫生活在中国四川的竹林里，主要吃竹子。",
         "qas": [{"query_id": "C1_Q0", "query_text": "熊猫主要吃什么？", "answers": [{"text": "竹子"}]}]},
        {"context_id": "C2", "context_text": "长江是中国最长的河流，流经上海入海。",
         "qas": [{"query_id": "C2_Q0", "query_text": "中国最长的河流是哪条？", "answers": [{"text": "长江"}]}]},
    ], ensure_ascii=False), encoding="utf-8")
    out = main(["--cmrc", str(cmrc), "--fusion", "rrf"])
    assert out["hybrid"]["hit@1"] == 1.0
    printed = json.loads(capsys.readouterr().out.split("\n}\n")[-2] + "\n}")
    assert printed["fusion"]["method"] == "rrf"


@pytest.mark.skipif(not (SHARED / "data" / "msmarco-5k").is_dir(), reason="../shared/data not present")
def test_shared_beir_loads():
    corpus, queries, qrels = load_beir(SHARED / "data" / "msmarco-5k")
    assert len(corpus) == 5000 and len(qrels) == 43
