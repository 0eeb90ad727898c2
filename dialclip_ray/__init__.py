"""dialclip-ray: multi-modal dialog retrieval with DialCLIP (prompt-tuned CLIP) on Ray."""

__version__ = "0.1.0"
