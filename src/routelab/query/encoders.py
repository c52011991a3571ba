"""Prompt encoders: text -> dense, L2-normalised embeddings [N, D] that the query routers learn from.

- `tfidf`: scikit-learn's TfidfVectorizer (word 1-2-grams, sublinear tf) followed by a truncated SVD (latent semantic
  analysis) to `dim` dense dimensions. Fitted on the training prompts; its state is plain arrays (vocabulary, idf,
  SVD components), so a saved router re-creates it without pickle and without scikit-learn's fit.
- `wordllama`: WordLlama's `l2_supercat` static token embeddings (average-pooled, 256-d), whose weights and
  tokenizer ship inside the PyPI wheel. Its default loader falls back to a Hugging Face download; routelab calls
  `WordLlama.load(cache_dir=<package folder>, disable_download=True)`, the documented offline path (the package's
  own `weights/` and `tokenizers/` folders are laid out as a cache), so loading never opens a socket.

Encoders are cached: the WordLlama model is loaded once per process, and each encoder instance memoises the
embeddings of the prompts it has seen (bounded), so routers sharing an encoder on the same split encode once.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path

import numpy as np

from routelab._checks import check_choice, check_int

ENCODERS = ("tfidf", "wordllama")
_MEMO_LIMIT = 200_000
_WORDLLAMA = None


def _normalise(x_ND: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x_ND, axis=1, keepdims=True)
    return (x_ND / np.maximum(norm, 1e-12)).astype(np.float32)


class Encoder:
    """Base: `fit(prompts)`, `encode(prompts) -> float32 [N, D]`, `state() -> (config, arrays)`, `from_state`."""

    name = ""

    def __init__(self) -> None:
        self._memo: OrderedDict[str, np.ndarray] = OrderedDict()

    def fit(self, prompts: list[str]) -> Encoder:
        return self

    def encode(self, prompts: list[str]) -> np.ndarray:
        keys = [hashlib.sha1(p.encode("utf-8", "surrogatepass")).hexdigest() for p in prompts]
        missing = sorted({k: i for i, k in enumerate(keys) if k not in self._memo}.items(), key=lambda kv: kv[1])
        if missing:
            fresh = self._encode([prompts[i] for _, i in missing])
            for (k, _), row in zip(missing, fresh):
                self._memo[k] = row
            while len(self._memo) > _MEMO_LIMIT:
                self._memo.popitem(last=False)
        if not keys:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([self._memo[k] for k in keys])

    def encode_uncached(self, prompts: list[str]) -> np.ndarray:
        return self._encode(list(prompts))

    def _encode(self, prompts: list[str]) -> np.ndarray:
        raise NotImplementedError

    @property
    def dim(self) -> int:
        raise NotImplementedError

    def state(self) -> tuple[dict, dict[str, np.ndarray]]:
        return {"name": self.name}, {}


class TfidfEncoder(Encoder):
    name = "tfidf"

    def __init__(self, *, dim: int = 128, max_features: int = 30000, seed: int = 0) -> None:
        super().__init__()
        check_int("encoder dim", dim, 2, 4096)
        check_int("encoder max_features", max_features, 10)
        self.dim_, self.max_features, self.seed = dim, max_features, seed
        self._vectorizer = None
        self._components_DV: np.ndarray | None = None

    @property
    def dim(self) -> int:
        return self.dim_ if self._components_DV is None else self._components_DV.shape[0]

    def _new_vectorizer(self, vocabulary=None):
        from sklearn.feature_extraction.text import TfidfVectorizer

        return TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1, max_features=self.max_features,
                               vocabulary=vocabulary, dtype=np.float64)

    def fit(self, prompts: list[str]) -> TfidfEncoder:
        from sklearn.decomposition import TruncatedSVD

        vec = self._new_vectorizer()
        x = vec.fit_transform(prompts)
        k = max(1, min(self.dim_, x.shape[1] - 1, x.shape[0] - 1))
        svd = TruncatedSVD(n_components=k, algorithm="randomized", n_iter=5, random_state=self.seed).fit(x)
        self._vectorizer, self._components_DV = vec, svd.components_.astype(np.float32)
        self._memo.clear()
        return self

    def _encode(self, prompts: list[str]) -> np.ndarray:
        if self._vectorizer is None:
            raise RuntimeError("the tfidf encoder is not fitted: call fit(prompts) first")
        x = self._vectorizer.transform(prompts)
        return _normalise(np.asarray(x @ self._components_DV.T))

    def state(self) -> tuple[dict, dict[str, np.ndarray]]:
        vocab = sorted(self._vectorizer.vocabulary_.items(), key=lambda kv: kv[1])
        config = {"name": self.name, "dim": self.dim_, "max_features": self.max_features, "seed": self.seed,
                  "vocabulary": [term for term, _ in vocab]}
        return config, {"idf": self._vectorizer.idf_.astype(np.float64), "components": self._components_DV}

    @classmethod
    def from_state(cls, config: dict, arrays: dict[str, np.ndarray]) -> TfidfEncoder:
        enc = cls(dim=config["dim"], max_features=config["max_features"], seed=config["seed"])
        vocabulary = {term: i for i, term in enumerate(config["vocabulary"])}
        vec = enc._new_vectorizer(vocabulary=vocabulary)
        vec.idf_ = arrays["idf"]  # sklearn accepts a stored idf vector: transform needs nothing else
        enc._vectorizer, enc._components_DV = vec, arrays["components"]
        return enc


def wordllama_model():
    """The WordLlama l2_supercat model from the files inside the installed wheel; never downloads."""
    global _WORDLLAMA
    if _WORDLLAMA is None:
        import wordllama
        from wordllama import WordLlama

        package = Path(wordllama.__file__).parent
        _WORDLLAMA = WordLlama.load(config="l2_supercat", dim=256, cache_dir=package, disable_download=True)
    return _WORDLLAMA


class WordLlamaEncoder(Encoder):
    name = "wordllama"

    @property
    def dim(self) -> int:
        return 256

    def _encode(self, prompts: list[str]) -> np.ndarray:
        if not prompts:
            return np.zeros((0, 256), dtype=np.float32)
        return _normalise(np.asarray(wordllama_model().embed(prompts), dtype=np.float32))

    @classmethod
    def from_state(cls, config: dict, arrays: dict[str, np.ndarray]) -> WordLlamaEncoder:
        return cls()


def create_encoder(name: str, *, seed: int = 0, dim: int = 128) -> Encoder:
    check_choice("encoder", name, ENCODERS)
    return TfidfEncoder(dim=dim, seed=seed) if name == "tfidf" else WordLlamaEncoder()


def encoder_from_state(config: dict, arrays: dict[str, np.ndarray]) -> Encoder:
    check_choice("encoder", config.get("name"), ENCODERS)
    cls = TfidfEncoder if config["name"] == "tfidf" else WordLlamaEncoder
    return cls.from_state(config, arrays)
