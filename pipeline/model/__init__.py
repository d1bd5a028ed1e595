"""CMHN: the model, its loss, exact streaming inference and checkpoints."""

from pipeline.model.checkpoint import CheckpointError, CheckpointMismatch, join_checkpoints, load_checkpoint, save_checkpoint
from pipeline.model.cmhn import (CMHN, PRESETS, QEN, VEN, CMHNConfig, build_cmhn, candidate_spans, ensemble, get_preset,
                                 moments_ending_at)
from pipeline.model.loss import cmhn_loss, smooth_sign, target_iou
from pipeline.model.streaming import Moment, StreamingEncoder, StreamStateError
from pipeline.model.tcn import TemporalBlock, TemporalConvNet

__all__ = [
    "CMHN",
    "CMHNConfig",
    "PRESETS",
    "QEN",
    "VEN",
    "CheckpointError",
    "CheckpointMismatch",
    "Moment",
    "StreamStateError",
    "StreamingEncoder",
    "TemporalBlock",
    "TemporalConvNet",
    "build_cmhn",
    "candidate_spans",
    "cmhn_loss",
    "ensemble",
    "get_preset",
    "join_checkpoints",
    "load_checkpoint",
    "moments_ending_at",
    "save_checkpoint",
    "smooth_sign",
    "target_iou",
]
