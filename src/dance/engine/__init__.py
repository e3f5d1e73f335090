"""Engine of DANCE: training loop, evaluation, checkpoints and cost accounting."""
