"""Data layer: loaders for real PhotoChat / MMDialog files, the canonical Parquet dataset, and torch readers.

Submodules are imported on use (``from dialclip_ray.data.dataset import CanonicalDataset``) so that
``dialclip data ...`` does not pay for torch or Ray when it does not need them.
"""
