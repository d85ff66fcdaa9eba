"""Inference with a finished model: calibrated predictions on new images, and where the model looked (saliency)."""
