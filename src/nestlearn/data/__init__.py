"""The data pipeline: corpus → filter → tokenizer → token shards → batches (DESIGN.md §2)."""

from nestlearn.data.corpus import Document
from nestlearn.data.errors import DataError
from nestlearn.data.loader import BatchLoader, iter_eval_batches
from nestlearn.data.prepare import PreparedData, prepare_data
from nestlearn.data.shards import open_shards
from nestlearn.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

__all__ = [
    "BatchLoader",
    "DataError",
    "Document",
    "PreparedData",
    "Tokenizer",
    "iter_eval_batches",
    "load_tokenizer",
    "open_shards",
    "prepare_data",
    "train_tokenizer",
]
