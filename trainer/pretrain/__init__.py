"""Pretraining of the shipped demo bases (``python -m trainer pretrain-demo``)."""
