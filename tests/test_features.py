"""The frozen feature store (built with Ray Data) and the online encoder's feature cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from checkpoint_support import make_checkpoint
from dialclip_ray.data.dataset import CanonicalDataset, ReaderConfig, build_query_batch, image_loader
from dialclip_ray.evaluation.local import embed_queries, evaluate_model
from dialclip_ray.features.build import build_feature_store, context_items
from dialclip_ray.features.store import (FeatureStore, FeatureStoreError, FeatureStoreMismatchError, check_store,
                                         open_for_model)
from dialclip_ray.model.checkpoint import load_checkpoint
from dialclip_ray.model.feature_cache import FeatureCache
from dialclip_ray.model.text import tokenize_texts


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def model_and_store(ray_cluster, tiny_corpus, checkpoint):
    model, backbone, _ = load_checkpoint(checkpoint)
    model.eval()
    path = build_feature_store(tiny_corpus.mmdialog, backbone.model_name, backbone.pretrained, actors=1)
    return model, backbone, path


def test_store_holds_float32_frozen_features_of_every_context_item(model_and_store, tiny_corpus):
    model, backbone, path = model_and_store
    store = FeatureStore.open(path, model.identity["weights_hash"], tiny_corpus.mmdialog)
    dataset = CanonicalDataset.load(tiny_corpus.mmdialog)
    texts, image_ids = context_items(dataset)
    assert store.info["turns"] == len(texts) and store.info["images"] == len(image_ids) > 0
    assert store.turn_features.dtype == np.float32 and store.image_features.dtype == np.float32
    with torch.no_grad():
        want = model.clip.encode_text(tokenize_texts(backbone.tokenizer, texts[:20], 77)).float().numpy()
        load = image_loader(dataset, backbone.preprocess_val)
        want_img = model.clip.encode_image(torch.stack([load(i) for i in image_ids[:8]])).float().numpy()
    np.testing.assert_allclose(store.turns(texts[:20]), want, atol=1e-5)
    np.testing.assert_allclose(store.images(image_ids[:8]), want_img, atol=1e-5)
    with pytest.raises(FeatureStoreError, match="no feature for context turn"):
        store.turns(["a turn this dataset never had"])


def test_metrics_equal_with_and_without_the_store(model_and_store, tiny_corpus):
    model, backbone, path = model_and_store
    dataset = CanonicalDataset.load(tiny_corpus.mmdialog)
    store = open_for_model(tiny_corpus.mmdialog, model, "require")
    assert store is not None and store.directory == path
    reader = ReaderConfig.from_model_config(model.cfg)
    records = dataset.examples("test")
    load = image_loader(dataset, backbone.preprocess_val)
    with torch.no_grad():
        plain = embed_queries(model, records, backbone.tokenizer, load, reader, 16)
        fast = embed_queries(model, records, backbone.tokenizer, load, reader, 16, features=store)
    np.testing.assert_allclose(fast, plain, atol=1e-5)
    without = evaluate_model(model, backbone, dataset, "test", reader, 16)
    with_store = evaluate_model(model, backbone, dataset, "test", reader, 16, features=store)
    assert with_store == without
    q = build_query_batch(records[:4], backbone.tokenizer, load, reader, store)
    assert q.has_features and q.images.shape[-1] == 1  # no context image was decoded


def test_store_is_refused_for_another_backbone_or_a_reprepared_dataset(model_and_store, tiny_corpus, tmp_path):
    model, _, path = model_and_store
    with pytest.raises(FeatureStoreMismatchError, match="weights"):
        FeatureStore.open(path, "0" * 16, tiny_corpus.mmdialog)
    # A store whose dataset was prepared again is stale, not silently reused.
    fake = tmp_path / "dataset"
    fake.mkdir()
    meta = json.loads((Path(tiny_corpus.mmdialog) / "meta.json").read_text())
    (fake / "meta.json").write_text(json.dumps({**meta, "created": "later"}))
    with pytest.raises(FeatureStoreError, match="stale"):
        check_store(path, model.identity["weights_hash"], fake)
    with pytest.raises(FeatureStoreError, match="never built"):
        check_store(tmp_path / "nothing-here")


def test_rebuild_is_a_noop_and_force_replaces_atomically(model_and_store, tiny_corpus):
    _, backbone, path = model_and_store
    before = (path / "store.json").read_text()
    assert build_feature_store(tiny_corpus.mmdialog, backbone.model_name, backbone.pretrained, actors=1) == path
    assert (path / "store.json").read_text() == before
    build_feature_store(tiny_corpus.mmdialog, backbone.model_name, backbone.pretrained, actors=1, force=True)
    assert json.loads((path / "store.json").read_text())["turns"] == json.loads(before)["turns"]
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no staging dir left


def test_feature_cache_encodes_only_the_new_turn_and_stays_bounded(model_and_store, tiny_corpus):
    model, backbone, _ = model_and_store
    dataset = CanonicalDataset.load(tiny_corpus.photochat)
    reader = ReaderConfig.from_model_config(model.cfg)
    load = image_loader(dataset, backbone.preprocess_val)
    record = max(dataset.examples("test"), key=lambda r: len(r.context))
    cache = FeatureCache(max_entries=1000)
    short = type(record)(**{**record.__dict__, "context": record.context[:-1]})
    with torch.no_grad():
        q_short = build_query_batch([short], backbone.tokenizer, load, reader)
        model.encode_query(q_short, feature_cache=cache)
        first = cache.misses
        q_full = build_query_batch([record], backbone.tokenizer, load, reader)
        cached = model.encode_query(q_full, feature_cache=cache)
        plain = model.encode_query(q_full)
    assert cache.misses - first == 1  # the conversation grew by one turn: one new encoding
    torch.testing.assert_close(cached, plain, atol=1e-6, rtol=0)
    small = FeatureCache(max_entries=3)
    with torch.no_grad():
        for r in dataset.examples("test")[:5]:
            model.encode_query(build_query_batch([r], backbone.tokenizer, load, reader), feature_cache=small)
    assert len(small) == 3 and small.misses > 3
