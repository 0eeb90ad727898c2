"""Hyperparameter sweeps of DialCLIP with Ray Tune (ASHA early stopping on validation Sum)."""
