"""Inference — pure PyTorch and pixels: model, preprocessing, Grad-CAM, training and evaluation.

Knows nothing about networking, Celery or settings.
"""
