"""Mask quality (mIoU, Dice and boundary IoU with box and point prompts), agreement with a
teacher, and speed."""

from samkd.evaluate.metrics import IoUTable, boundary_iou, dice_score, mask_iou, size_bucket
from samkd.evaluate.predict import MaskPrediction, ObjectPrompts, encode_images, predict_masks
from samkd.evaluate.quality import QualityOptions, QualityTables, evaluate_image
from samkd.evaluate.run import run_eval
from samkd.evaluate.speed import SpeedReport, measure_speed

__all__ = [
    "IoUTable",
    "MaskPrediction",
    "ObjectPrompts",
    "QualityOptions",
    "QualityTables",
    "SpeedReport",
    "boundary_iou",
    "dice_score",
    "encode_images",
    "evaluate_image",
    "mask_iou",
    "measure_speed",
    "predict_masks",
    "run_eval",
    "size_bucket",
]
