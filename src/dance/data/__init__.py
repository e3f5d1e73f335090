"""Data side of DANCE: datasets, SynthStreets, spatial complexity, the slimming plan, the sampler."""
