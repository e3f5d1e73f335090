"""Segmentation models with gated multi-scale modules (docs/method.md#network-slimming); each
file registers its own builders with ``dance.network.registry.register_model``."""
