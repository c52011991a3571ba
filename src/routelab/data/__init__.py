"""Text corpora → local byte-level BPE → per-domain token streams, train/validation split, batches."""

from routelab.data.corpus import DataError, Domain, builtin_corpus, file_corpus
from routelab.data.dataset import DomainTokens, TokenData, split_text, tokenize_domains
from routelab.data.tokenizer import cache_dir, encode, load_or_train_tokenizer, train_tokenizer

__all__ = [
    "DataError",
    "Domain",
    "DomainTokens",
    "TokenData",
    "builtin_corpus",
    "cache_dir",
    "encode",
    "file_corpus",
    "load_or_train_tokenizer",
    "split_text",
    "tokenize_domains",
    "train_tokenizer",
]
