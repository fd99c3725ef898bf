"""Writes a compact teacher_topk shard set like a stage does (skipping complete shards); used by the
SIGKILL test. With --slow S every fsync first sleeps S seconds, which keeps each shard's temp file
on disk long enough for the test to kill the process in the middle of a shard."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from storage.codecs import codec_info, encode_records  # noqa: E402
from storage.shardset import ShardSet  # noqa: E402
from storage.synthetic import make_records  # noqa: E402

VOCAB, K = 300, 16


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root", type=Path)
    parser.add_argument("shards", type=int)
    parser.add_argument("--slow", type=float, default=0.0)
    args = parser.parse_args()
    if args.slow:
        real_fsync = os.fsync

        def slow_fsync(fd: int) -> None:
            time.sleep(args.slow)
            real_fsync(fd)

        os.fsync = slow_fsync
    shard_set = ShardSet.create(args.root, "teacher_topk",
                                {"teacher_fingerprint": "t0", **codec_info("compact", K, VOCAB)})
    for index in range(args.shards):
        if shard_set.is_complete(index):
            continue
        records = make_records(VOCAB, K, num_rollouts=12, response_len=16, seed=index)
        shard_set.write_shard(index, encode_records(records, "compact", K, VOCAB), row_group_size=4)
        print(f"wrote {index}", flush=True)
    shard_set.finalize(expected_shards=args.shards)


if __name__ == "__main__":
    main()
