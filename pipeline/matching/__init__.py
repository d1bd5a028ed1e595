"""Matching moment codes to queries: exact Hamming search, standing queries and retrospective search."""

from pipeline.matching.archive import ArchiveHit, MomentArchive
from pipeline.matching.matcher import BinaryIndex, range_search, topk
from pipeline.matching.standing import Hit, HitMerger, StandingQueries, temporal_iou

__all__ = [
    "ArchiveHit", "BinaryIndex", "Hit", "HitMerger", "MomentArchive", "StandingQueries", "range_search",
    "temporal_iou", "topk",
]
