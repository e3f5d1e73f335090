"""Network side of DANCE: gated multi-scale models, FLOPs, progressive structural slimming."""
