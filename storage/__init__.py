"""lopd storage: Arrow, Parquet, numpy and bytes only (no torch, transformers or prefect)."""

from storage.codecs import CODECS, codec_info, decode_table, encode_records
from storage.reader import ReaderState, iter_batches
from storage.records import TAIL_LOGPROB_FLOOR, TeacherRecord, compute_tail_logprob
from storage.shardset import (
    CorruptShardError,
    IncompleteShardSetError,
    ShardSet,
    ShardSetError,
    ShardSetMismatchError,
    ShardSetNotFoundError,
    ShardWriter,
    WriteBehind,
)

__all__ = [
    "CODECS",
    "TAIL_LOGPROB_FLOOR",
    "CorruptShardError",
    "IncompleteShardSetError",
    "ReaderState",
    "ShardSet",
    "ShardSetError",
    "ShardSetMismatchError",
    "ShardSetNotFoundError",
    "ShardWriter",
    "TeacherRecord",
    "WriteBehind",
    "codec_info",
    "compute_tail_logprob",
    "decode_table",
    "encode_records",
    "iter_batches",
]
