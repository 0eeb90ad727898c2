"""The frozen feature store: CLIP features of dialog contexts, computed once per dataset and backbone.

``store`` is the on-disk store (float32, refused for another backbone or a
re-prepared dataset) and its lookups; ``build`` is the Ray Data job that fills
it. Training and evaluation read it instead of running the frozen towers; the
online encoder's counterpart is ``model.feature_cache`` (a bounded LRU).
"""
