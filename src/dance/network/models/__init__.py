"""Segmentation models with gated multi-scale modules (SPEC §1.4); each file registers its own
builders with ``dance.network.registry.register_model``."""
