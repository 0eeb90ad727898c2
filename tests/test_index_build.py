"""`dialclip index build`: Ray Data embeds every corpus id into a sharded index tied to the checkpoint."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dialclip_ray.model.checkpoint import load_checkpoint
from dialclip_ray.cli import main
from dialclip_ray.data.dataset import CanonicalDataset, image_loader
from dialclip_ray.evaluation.local import embed_images, embed_texts
from dialclip_ray.index import IndexManifest
from dialclip_ray.index.layout import INFO_FILE, IndexLayout, checkpoint_identity, file_sha256, write_index


from checkpoint_support import make_checkpoint  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"))


def vectors_of(sub_index) -> tuple[list[str], np.ndarray]:
    manifest = IndexManifest.load(sub_index)
    ids, vecs = [], []
    for s in manifest.shards:
        index = faiss.read_index(str(sub_index / s.index_file))
        vecs.append(index.reconstruct_n(0, index.ntotal))
        ids += pq.read_table(sub_index / s.id_map_file).column("id").to_pylist()
    return ids, np.concatenate(vecs)


def test_cli_build_indexes_every_corpus_id(ray_cluster, tiny_corpus, checkpoint, tmp_path, capsys):
    out = tmp_path / "index"
    assert main(["index", "build", "--checkpoint", str(checkpoint), "--corpus", str(tiny_corpus.photochat),
                 "--corpus", str(tiny_corpus.mmdialog), "--shards", "2", "--kind", "flat", "--out", str(out),
                 "--actors", "1"]) == 0
    assert "index written to" in capsys.readouterr().out
    layout = IndexLayout.load(out)
    ident = layout.identity
    assert ident["checkpoint_sha256"] == file_sha256(checkpoint / "dialclip.pt")
    assert ident == checkpoint_identity(checkpoint) and len(ident["config_sha256"]) == 64
    assert set(layout.manifests) == {"image", "text"}
    assert all(len(m.shards) == 2 and m.identity == ident for m in layout.manifests.values())

    model, backbone, _ = load_checkpoint(checkpoint)
    datasets = [CanonicalDataset.load(d) for d in (tiny_corpus.photochat, tiny_corpus.mmdialog)]
    images = {}
    for d in (tiny_corpus.photochat, tiny_corpus.mmdialog):
        t = pq.read_table(d / "images.parquet")
        for i, p in zip(t.column("image_id").to_pylist(), t.column("path").to_pylist()):
            images.setdefault(i, (d, p))
    ids, vecs = vectors_of(out / "image")
    assert sorted(ids) == sorted(images)  # every image id once, deduplicated across corpora
    meta = pq.read_table(out / "image" / "shard-00000.ids.parquet").to_pylist()
    assert all(row["path"] == images[row["id"]][1] for row in meta)
    for ds in datasets:  # vectors equal the single-process candidate encoder's
        own = [i for i in ids if images[i][0] == ds.directory][:8]
        ref = embed_images(model, own, image_loader(ds, backbone.preprocess_val))
        np.testing.assert_allclose(vecs[[ids.index(i) for i in own]], ref, atol=1e-5)

    text_ids, text_vecs = vectors_of(out / "text")
    texts = dict(zip(*[pq.read_table(tiny_corpus.mmdialog / "texts.parquet").column(c).to_pylist()
                       for c in ("text_id", "text")]))
    assert sorted(text_ids) == sorted(texts)
    ref = embed_texts(model, [texts[t] for t in text_ids[:8]], backbone.tokenizer)
    np.testing.assert_allclose(text_vecs[:8], ref, atol=1e-5)

    with pytest.raises(FileExistsError, match="already exists"):
        main(["index", "build", "--checkpoint", str(checkpoint), "--corpus", str(tiny_corpus.photochat),
              "--out", str(out)])


def test_failed_write_leaves_nothing(tmp_path, checkpoint):
    ident = checkpoint_identity(checkpoint)
    good = np.random.default_rng(0).standard_normal((6, 8)).astype(np.float32)
    bad = good.copy()
    bad[3, 0] = np.nan
    meta = pa.table({"text": [f"t{i}" for i in range(6)]})
    with pytest.raises(ValueError, match="non-finite"):
        write_index(tmp_path / "idx", {"image": ([f"i{i}" for i in range(6)], good, None),
                                       "text": ([f"t{i}" for i in range(6)], bad, meta)}, ident, shards=2)
    assert list(tmp_path.iterdir()) == []  # neither the index nor its temp dir
    layout = write_index(tmp_path / "idx", {"text": ([f"t{i}" for i in range(6)], good, meta)}, ident, shards=4)
    assert json.loads((tmp_path / "idx" / INFO_FILE).read_text())["modalities"]["text"]["shards"] == 4
    assert layout.num_shards == 4 and layout.dim == 8


def test_bad_arguments_are_refused(tmp_path, tiny_corpus, checkpoint):
    with pytest.raises(ValueError, match="nprobe"):
        main(["index", "build", "--checkpoint", str(checkpoint), "--corpus", str(tiny_corpus.photochat),
              "--kind", "ivf", "--param", "nlist=4", "--param", "nprobe=8", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit):
        main(["index", "build", "--checkpoint", str(checkpoint), "--corpus", str(tiny_corpus.photochat),
              "--kind", "lsh", "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()
