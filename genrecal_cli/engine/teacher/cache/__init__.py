"""The teacher-feature cache: one teacher pass written to disk (`genrecal teach`), read by any
number of students instead of running the teacher again.

format.py: what is stored per item and how a folder lies; writer.py: shards written atomically
and resumed; reader.py: a finished cache read and checked; fingerprint.py: what a cache was
computed from.
"""

from .fingerprint import fingerprint, fingerprint_changes, hub_commit, weights_digest
from .format import ItemFeatures, join_items, size_estimate, split_items
from .reader import CacheReader, check_answers, check_shard, read_index, verify
from .writer import CacheWriter, complete, merge_index

__all__ = ["CacheReader", "CacheWriter", "ItemFeatures", "check_answers", "check_shard", "complete", "fingerprint",
           "fingerprint_changes", "hub_commit", "join_items", "merge_index", "read_index", "size_estimate", "split_items", "verify",
           "weights_digest"]
