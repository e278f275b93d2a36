"""Text (and image) embedders behind one small interface, all returning L2-normalised float32 rows.

- `HashedNgramLSA` (the offline default, no pretrained weights): character 1-3-grams hashed into 2^16
  buckets, sublinear TF-IDF, projected to 256 dimensions by a truncated SVD (LSA) fitted on the first
  corpus indexed, plus 128 dimensions of a fixed count sketch of the same TF-IDF vector (weight 0.3).
  Character n-grams need no word segmentation, so the same code serves Chinese and English and
  tolerates spelling variants and words jieba cuts differently; BM25 then covers exact terms. The fit
  (idf + projection) is frozen in the index folder: later incremental updates reuse it, so unchanged
  chunks never need re-embedding. The sketch part needs no fit: text added later whose n-grams the
  LSA never saw (a new topic) still gets a meaningful vector instead of ~0 (CMRC nDCG@10 cost: 0.0006).
- `SentenceTransformerEmbedder`: any sentence-transformers model by local path (or hub name).
- `OpenClipEmbedder`: open_clip text and image towers in one space (text-to-image search).

`spec()` is what the index manifest stores; `embedder_from_spec` rebuilds the embedder from it.
`dense_weight` is the embedder's default share in weighted score fusion (see rag/fusion.py).
"""
from __future__ import annotations

import hashlib
import io
import json
import unicodedata
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np
import scipy.sparse as sp


def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(n, 1e-12)


class Embedder:
    """Interface. Subclasses set `dim`, `name`, and implement `_embed`."""

    dim: int
    name: str
    dense_weight: float = 0.5
    supports_images: bool = False
    needs_fit: bool = False

    def spec(self) -> dict:
        raise NotImplementedError

    def _embed(self, texts: list[str], progress: bool) -> np.ndarray:
        raise NotImplementedError

    def embed_documents(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        if not len(texts):
            return np.zeros((0, self.dim), np.float32)
        return l2_normalize(self._embed(list(texts), progress))

    def embed_query(self, text: str) -> np.ndarray:
        return self.embed_documents([text])[0]

    def embed_images(self, images: Sequence[bytes], progress: bool = False) -> np.ndarray:
        raise NotImplementedError(f"{self.name} has no image tower")

    # fitted embedders only
    def fit(self, texts: Sequence[str]) -> None:
        pass

    def save(self, folder: Path) -> None:
        pass

    def load(self, folder: Path) -> None:
        pass


# ---- offline default -----------------------------------------------------------------------------
class HashedNgramLSA(Embedder):
    dense_weight = 0.5
    needs_fit = True

    def __init__(self, dim: int = 256, bits: int = 16, ngrams: tuple[int, ...] = (1, 2, 3),
                 fit_sample: int = 8000, seed: int = 0, sketch_dim: int = 128, sketch_weight: float = 0.3):
        self.lsa_dim, self.bits, self.ngrams, self.fit_sample, self.seed = dim, bits, tuple(ngrams), fit_sample, seed
        self.sketch_dim, self.sketch_weight = sketch_dim, sketch_weight
        self.dim = dim + sketch_dim
        self.idf: np.ndarray | None = None
        self.components: np.ndarray | None = None  # [buckets, dim]
        self.fit_id = ""

    @property
    def name(self) -> str:
        return f"hashed-ngram-lsa(dim={self.lsa_dim}+{self.sketch_dim},bits={self.bits},ngrams={list(self.ngrams)},fit={self.fit_id})"

    def spec(self) -> dict:
        return {"kind": "hashed-ngram-lsa", "dim": self.lsa_dim, "sketch_dim": self.sketch_dim,
                "sketch_weight": self.sketch_weight, "bits": self.bits, "ngrams": list(self.ngrams),
                "fit_sample": self.fit_sample, "seed": self.seed, "fit_id": self.fit_id}

    def counts(self, texts: Sequence[str]) -> sp.csr_matrix:
        """Hashed character n-gram counts, one row per text, fully vectorised per text."""
        mult = np.uint64(0x9E3779B97F4A7C15)
        shift = np.uint64(64 - self.bits)
        indptr, indices, data = [0], [], []
        for t in texts:
            t = " ".join(unicodedata.normalize("NFKC", t).lower().split())
            c = np.frombuffer(t.encode("utf-32-le"), dtype="<u4").astype(np.uint64)
            buckets = []
            for n in self.ngrams:
                if len(c) < n:
                    continue
                h = np.full(len(c) - n + 1, np.uint64(n))
                for j in range(n):  # polynomial rolling hash; uint64 arithmetic wraps on purpose
                    h = h * np.uint64(1000003) + c[j:len(c) - n + 1 + j]
                buckets.append((h * mult) >> shift)
            if buckets:
                b, cnt = np.unique(np.concatenate(buckets), return_counts=True)
                indices.append(b.astype(np.int64))
                data.append(cnt.astype(np.float32))
                indptr.append(indptr[-1] + len(b))
            else:
                indptr.append(indptr[-1])
        cat = (lambda xs, dt: np.concatenate(xs) if xs else np.zeros(0, dt))
        return sp.csr_matrix((cat(data, np.float32), cat(indices, np.int64), np.asarray(indptr)),
                             shape=(len(texts), 2 ** self.bits))

    def _tfidf(self, counts: sp.csr_matrix) -> sp.csr_matrix:
        x = counts.copy()
        x.data = 1.0 + np.log(x.data)
        x = x.multiply(self.idf[None, :]).tocsr()
        norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=1))).ravel()
        return sp.diags(1.0 / np.maximum(norms, 1e-12)) @ x

    def fit(self, texts: Sequence[str]) -> None:
        """idf and an LSA projection from (a seeded sample of) the corpus; randomized SVD (Halko et al.)."""
        rng = np.random.default_rng(self.seed)
        texts = list(texts)
        if len(texts) > self.fit_sample:
            texts = [texts[i] for i in sorted(rng.choice(len(texts), self.fit_sample, replace=False))]
        counts = self.counts(texts)
        df = np.bincount(counts.indices, minlength=2 ** self.bits).astype(np.float32)
        self.idf = (np.log((1 + len(texts)) / (1 + df)) + 1).astype(np.float32)
        x = self._tfidf(counts).astype(np.float32)
        k = min(self.lsa_dim, max(1, min(x.shape) - 1))
        q = rng.standard_normal((x.shape[1], k + 10)).astype(np.float32)
        y = x @ q
        for _ in range(3):  # power iterations sharpen the spectrum
            y, _ = np.linalg.qr(y)
            y, _ = np.linalg.qr(x @ (x.T @ y))
        # Right singular vectors of B = Y^T X without an SVD of the wide B: X^T Y = Q R, svd(R) = U S V^T,
        # so B = V S (Q U)^T and the projection is Q U (a [buckets, k+10] QR is cheap, a wide SVD is not).
        qb, rb = np.linalg.qr(np.asarray(x.T @ y, np.float32))
        u, _, _ = np.linalg.svd(rb)
        comp = np.zeros((x.shape[1], self.lsa_dim), np.float32)
        comp[:, :k] = (qb @ u)[:, :k]
        self.components = comp.astype(np.float16).astype(np.float32)  # as saved: reloads embed identically
        self.fit_id = hashlib.sha256(comp[:64].tobytes() + self.idf.tobytes()).hexdigest()[:12]

    def _embed(self, texts: list[str], progress: bool) -> np.ndarray:
        if self.components is None:
            raise RuntimeError("HashedNgramLSA is not fitted: call fit(texts) or load(folder) first")
        out = []
        for i in range(0, len(texts), 2048):
            x = self._tfidf(self.counts(texts[i:i + 2048]))
            lsa = np.asarray(x @ self.components, np.float32)
            if self.sketch_dim:  # fixed count sketch of the TF-IDF vector: n-grams unseen at fit time still count
                lsa = np.hstack([l2_normalize(lsa) * np.sqrt(1 - self.sketch_weight),
                                 l2_normalize((x @ self._sketch()).toarray().astype(np.float32)) * np.sqrt(self.sketch_weight)])
            out.append(lsa)
        return np.concatenate(out)

    def _sketch(self) -> sp.csr_matrix:
        """[buckets, sketch_dim] matrix with one random +-1 per row (seeded: identical for every load)."""
        if getattr(self, "_sketch_mat", None) is None:
            rng = np.random.default_rng(self.seed + 1)
            n = 2 ** self.bits
            self._sketch_mat = sp.csr_matrix((rng.choice([-1.0, 1.0], n).astype(np.float32),
                                              (np.arange(n), rng.integers(0, self.sketch_dim, n))),
                                             shape=(n, self.sketch_dim))
        return self._sketch_mat

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "idf.npy", self.idf, allow_pickle=False)
        np.save(folder / "components.npy", self.components.astype(np.float16), allow_pickle=False)
        (folder / "embedder.json").write_text(json.dumps(self.spec()), encoding="utf-8")

    def load(self, folder: Path) -> None:
        self.idf = np.load(folder / "idf.npy", allow_pickle=False)
        self.components = np.load(folder / "components.npy", allow_pickle=False).astype(np.float32)
        self.fit_id = json.loads((folder / "embedder.json").read_text(encoding="utf-8"))["fit_id"]


# ---- pretrained backends -------------------------------------------------------------------------
class SentenceTransformerEmbedder(Embedder):
    """sentence-transformers model; documents through `encode`, single queries through a lean fast path.

    `embed_query` is the per-search cost, so for the plain text pipeline (Transformer -> Pooling
    mean/cls/max -> optional Normalize, no prompt, no truncate_dim) it skips `encode`'s per-call work
    (input sorting, batching, progress-bar and device bookkeeping, tensor/numpy round trips): one
    tokenizer call on a reused `tokenizers` instance, one forward under `torch.inference_mode`, pooling
    over the (unpadded) tokens. For BERT encoders the forward itself is a lean re-statement of
    BertModel's (fused QKV projection, SDPA, no pooler head, no mask building); other architectures
    call the HF model. Same fp32 weights and ops, so the vectors equal `encode(...,
    normalize_embeddings=True)` (tests check allclose 1e-5), and a probe sentence is compared at load:
    any mismatch falls back to `encode`. (The lean path holds a fused copy of the QKV weights taken at
    load: rebuild the embedder after changing the model's weights.) Thread counts are torch's own
    (OMP_NUM_THREADS); nothing is set here. A small LRU cache answers repeated identical queries
    (`query_cache=0` turns it off).
    """

    dense_weight = 0.8  # tuned on msmarco-5k with all-MiniLM-L6-v2 (bench/bench_rag_quality.py sweep)
    _PROBE = "A probe sentence, checked against encode() once at load."

    def __init__(self, path: str, batch_size: int = 32, device: str = "cpu", query_cache: int = 256,
                 fast_queries: bool = True):
        from sentence_transformers import SentenceTransformer

        self.path, self.batch_size = str(path), batch_size
        self.model = SentenceTransformer(self.path, device=device)
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(get_dim())
        self.name = f"sentence-transformers({Path(self.path).name},dim={self.dim})"
        self.query_cache = query_cache
        self._qcache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._fast = _FastTextEncoder.build(self.model, self._PROBE) if fast_queries else None

    @property
    def fast_path(self) -> str | None:
        """None (queries go through `encode`), "bert-lean" or "hf-forward"."""
        return self._fast.kind if self._fast is not None else None

    def spec(self) -> dict:
        return {"kind": "sentence-transformers", "path": self.path}

    def _embed(self, texts: list[str], progress: bool) -> np.ndarray:
        return self.model.encode(texts, batch_size=self.batch_size, show_progress_bar=progress,
                                 convert_to_numpy=True, normalize_embeddings=True)

    def embed_query(self, text: str) -> np.ndarray:
        hit = self._qcache.get(text)
        if hit is not None:
            self._qcache.move_to_end(text)
            return hit.copy()
        v = l2_normalize(self._fast(text)) if self._fast is not None else super().embed_query(text)
        if self.query_cache > 0:
            self._qcache[text] = v
            if len(self._qcache) > self.query_cache:
                self._qcache.popitem(last=False)
            return v.copy()
        return v


def _pooling_mode(pool) -> str | None:
    mode = getattr(pool, "pooling_mode", None)  # sentence-transformers >= 6; older: get_pooling_mode_str()
    if mode is None and hasattr(pool, "get_pooling_mode_str"):
        mode = pool.get_pooling_mode_str()
    return mode if isinstance(mode, str) else None


class _FastTextEncoder:
    """One text -> pooled float32 vector with a sentence-transformers model's own weights (see above)."""

    def __init__(self, model, kind: str):
        import torch
        from tokenizers import Tokenizer

        tr, self.pool = model[0], _pooling_mode(model[1])
        self.kind, self.hf = kind, tr.auto_model
        self.device = next(self.hf.parameters()).device
        # A private copy of the fast tokenizer: no padding, ST's truncation length, special tokens added.
        self.tok = Tokenizer.from_str(tr.tokenizer.backend_tokenizer.to_str())
        self.tok.no_padding()
        self.tok.enable_truncation(int(tr.max_seq_length or tr.tokenizer.model_max_length))
        if kind == "bert-lean":
            cfg, e = self.hf.config, self.hf.embeddings
            d = lambda t: t.detach()  # noqa: E731
            self.emb = (d(e.word_embeddings.weight), d(e.position_embeddings.weight),
                        d(e.token_type_embeddings.weight[0]), d(e.LayerNorm.weight), d(e.LayerNorm.bias),
                        e.LayerNorm.eps)
            self.heads, self.hidden = cfg.num_attention_heads, cfg.hidden_size
            self.layers = []
            for layer in self.hf.encoder.layer:
                sa, ao = layer.attention.self, layer.attention.output
                self.layers.append((
                    torch.cat([d(sa.query.weight), d(sa.key.weight), d(sa.value.weight)]).contiguous(),
                    torch.cat([d(sa.query.bias), d(sa.key.bias), d(sa.value.bias)]).contiguous(),
                    d(ao.dense.weight), d(ao.dense.bias),
                    d(ao.LayerNorm.weight), d(ao.LayerNorm.bias), ao.LayerNorm.eps,
                    d(layer.intermediate.dense.weight), d(layer.intermediate.dense.bias),
                    d(layer.output.dense.weight), d(layer.output.dense.bias),
                    d(layer.output.LayerNorm.weight), d(layer.output.LayerNorm.bias), layer.output.LayerNorm.eps))

    @classmethod
    def build(cls, model, probe: str) -> "_FastTextEncoder | None":
        """The fast encoder when `model` is the plain text pipeline and matches `encode` on a probe; else None."""
        try:
            try:
                from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
            except ImportError:  # sentence-transformers < 6
                from sentence_transformers.models import Normalize, Pooling, Transformer

            mods = list(model)
            if not (len(mods) in (2, 3) and isinstance(mods[0], Transformer) and isinstance(mods[1], Pooling)
                    and (len(mods) == 2 or isinstance(mods[2], Normalize))):
                return None
            tr, pool = mods[0], mods[1]
            if (_pooling_mode(pool) not in ("mean", "cls", "max")
                    or getattr(model, "default_prompt_name", None) or getattr(model, "truncate_dim", None)
                    or getattr(tr, "do_lower_case", False) or getattr(tr, "query_length", None)
                    or getattr(tr, "document_length", None) or getattr(tr, "model_forward_params", None)
                    or getattr(tr, "backend", "torch") != "torch"
                    or not getattr(getattr(tr, "tokenizer", None), "is_fast", False)):
                return None
            hf = tr.auto_model
            cfg = hf.config
            bert = (type(hf).__name__ == "BertModel" and cfg.hidden_act == "gelu"
                    and getattr(cfg, "position_embedding_type", "absolute") in (None, "absolute")
                    and not getattr(cfg, "is_decoder", False))
            model.eval()
            import torch

            want = model.encode([probe], convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False)[0]
            for kind in (["bert-lean"] if bert else []) + ["hf-forward"]:
                fast = cls(model, kind)
                with torch.inference_mode():
                    got = l2_normalize(fast(probe))
                if got.shape == want.shape and np.allclose(got, want, atol=1e-5):
                    return fast
        except Exception:  # any surprise in a model's layout: the plain encode() path stays
            return None
        return None

    def __call__(self, text: str) -> np.ndarray:
        import torch

        ids = torch.tensor(self.tok.encode(text).ids, dtype=torch.long, device=self.device)
        with torch.inference_mode():
            h = self._bert(ids) if self.kind == "bert-lean" else \
                self.hf(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None]).last_hidden_state[0]
            v = h.mean(0) if self.pool == "mean" else h[0] if self.pool == "cls" else h.max(0).values
            return v.float().cpu().numpy()

    def _bert(self, ids):
        """BertModel.forward for one unpadded sequence (eval mode: no dropout, no mask), without the pooler."""
        import torch.nn.functional as F

        word, pos, typ, ln_w, ln_b, eps = self.emb
        t, d, heads = ids.shape[0], self.hidden, self.heads
        h = F.layer_norm(word[ids] + pos[:t] + typ, (d,), ln_w, ln_b, eps)
        for wqkv, bqkv, wo, bo, l1w, l1b, e1, wi, bi, wo2, bo2, l2w, l2b, e2 in self.layers:
            qkv = F.linear(h, wqkv, bqkv).view(t, 3, heads, d // heads).permute(1, 2, 0, 3)
            att = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2]).transpose(0, 1).reshape(t, d)
            h = F.layer_norm(F.linear(att, wo, bo) + h, (d,), l1w, l1b, e1)
            h = F.layer_norm(F.linear(F.gelu(F.linear(h, wi, bi)), wo2, bo2) + h, (d,), l2w, l2b, e2)
        return h


class OpenClipEmbedder(Embedder):
    """open_clip text + image towers (a local checkpoint path, an open_clip pretrained tag, or random init)."""

    supports_images = True
    dense_weight = 0.5

    def __init__(self, model_name: str, pretrained: str | None = None, batch_size: int = 32):
        import open_clip
        import torch

        try:  # our own small CLIP configs (vlm/clip_configs) become known to open_clip
            import vlm.vision  # noqa: F401
        except Exception:
            pass
        self.model_name, self.pretrained, self.batch_size = model_name, pretrained, batch_size
        torch.manual_seed(0)  # random-init models (tests) are then reproducible across loads
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(model_name)
        with torch.no_grad():
            self.dim = int(self.model.encode_text(self.tokenizer(["x"])).shape[-1])
        self.name = f"open_clip({model_name},{pretrained or 'random-init'},dim={self.dim})"

    def spec(self) -> dict:
        return {"kind": "open_clip", "model": self.model_name, "pretrained": self.pretrained}

    def _embed(self, texts: list[str], progress: bool) -> np.ndarray:
        import torch

        out = []
        with torch.no_grad():
            for i in range(0, len(texts), self.batch_size):
                out.append(self.model.encode_text(self.tokenizer(texts[i:i + self.batch_size])).float().numpy())
        return np.concatenate(out)

    def embed_images(self, images: Sequence[bytes], progress: bool = False) -> np.ndarray:
        import torch
        from PIL import Image

        out = []
        with torch.no_grad():
            for i in range(0, len(images), self.batch_size):
                batch = torch.stack([self.preprocess(Image.open(io.BytesIO(b)).convert("RGB"))
                                     for b in images[i:i + self.batch_size]])
                out.append(self.model.encode_image(batch).float().numpy())
        return l2_normalize(np.concatenate(out)) if out else np.zeros((0, self.dim), np.float32)


def embedder_from_spec(spec: dict) -> Embedder:
    kind = spec.get("kind")
    if kind == "hashed-ngram-lsa":
        return HashedNgramLSA(spec["dim"], spec["bits"], tuple(spec["ngrams"]), spec["fit_sample"], spec["seed"],
                              spec.get("sketch_dim", 0), spec.get("sketch_weight", 0.3))
    if kind == "sentence-transformers":
        return SentenceTransformerEmbedder(spec["path"])
    if kind == "open_clip":
        return OpenClipEmbedder(spec["model"], spec.get("pretrained"))
    raise ValueError(f"unknown embedder kind {kind!r} in index manifest")


def make_embedder(name: str | None) -> Embedder:
    """CLI/user shorthand: None or "default" -> offline default; "clip:MODEL[:PRETRAINED]"; else a path."""
    if name in (None, "", "default", "hashed-ngram-lsa"):
        return HashedNgramLSA()
    if name.startswith("clip:"):
        parts = name.split(":", 2)
        return OpenClipEmbedder(parts[1], parts[2] if len(parts) > 2 else None)
    return SentenceTransformerEmbedder(name)
