"""Data-parallel prompt tuning of DialCLIP with Ray Train (TorchTrainer, V2 API)."""
