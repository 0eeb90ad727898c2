"""The benchmark results writer (dialclip_ray.pipelines.benchmark): JSON layout, Markdown, plot."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dialclip_ray.pipelines import benchmark as B


def _runs(rng: np.random.Generator) -> B.BenchmarkRuns:
    runs = B.BenchmarkRuns()
    q = {("photochat", "dialog_to_image"): (400, 1000), ("mmdialog", "dialog_to_image"): (300, 1000),
         ("mmdialog", "dialog_to_text"): (500, 1000)}
    base = {k: rng.integers(1, 60, size=n) for k, (n, _) in q.items()}
    for variant, seeds, better in (("zeroshot", 1, 0), ("default", 3, 1), ("finetune", 2, 0)):
        for seed in range(seeds):
            for dataset in ("photochat", "mmdialog"):
                per = {}
                for (d, rtype), (n, cands) in q.items():
                    if d != dataset:
                        continue
                    ranks = base[(d, rtype)].copy()
                    if better:  # dialclip: every query at least as good, many at rank 1
                        ranks[: n // 3] = 1
                    per[rtype] = B.QueryRanks(ranks, [f"{d}/{i}" for i in range(n)], cands)
                runs.add(variant, seed, dataset, per, {"lr": 0.002, "train_seconds": 1.0})
    return runs


def test_write_results_json_markdown_and_plot(tmp_path):
    runs = _runs(np.random.default_rng(0))
    backbone = {"model_name": "dialclip-small", "heldout_caption_to_image_R@1": 41.5, "heldout_pool": 1000,
                "checkpoint": B.rel(B.REPO / "runs" / "x.pt")}
    report = B.write_results(tmp_path / "bench", runs, backbone, {"command": "python bench/x.py", "seeds": {}},
                             n_boot=500)
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data == json.loads(json.dumps(report))
    assert data["backbone"]["heldout_caption_to_image_R@1"] == 41.5 and data["backbone"]["heldout_pool"] == 1000
    assert data["backbone"]["checkpoint"] == "runs/x.pt"
    assert data["protocol"]["command"] == "python bench/x.py"
    rows = data["results"]
    assert len(rows) == 3 * (1 + 3 + 2)  # tasks x (seeds of each variant)
    for r in rows:
        assert set(r) >= {"variant", "dataset", "retrieval_type", "seed", "queries", "candidates", "R@1", "R@5",
                          "R@10", "Sum"}
        assert r["candidates"] == 1000 and r["Sum"] == pytest.approx(r["R@1"] + r["R@5"] + r["R@10"], abs=0.01)
    comps = [c for c in data["comparisons"] if c["a"] == "default" and c["b"] == "zeroshot"]
    assert len(comps) == 3 * 2  # tasks x (Sum, R@1)
    for c in comps:
        assert len(c["ci95"]) == 2 and c["ci95"][0] > 0 and c["diff"] > 0 and c["verdict"] == "a better"
    assert not [c for c in data["comparisons"] if "ungated" in (c["a"], c["b"])]  # absent variants are skipped
    same = [c for c in data["comparisons"] if c["a"] == "finetune" and c["b"] == "zeroshot"]
    assert same and all(c["diff"] == 0 and c["ci95"] == [0, 0] for c in same)
    summ = {(s["variant"], s["dataset"], s["retrieval_type"]): s for s in data["summary"]}
    assert summ[("default", "mmdialog", "dialog_to_text")]["seeds"] == [0, 1, 2]
    assert (tmp_path / "bench.png").stat().st_size > 1000
    md = (tmp_path / "bench.md").read_text()
    assert "| default | 3 |" in md and "a better" in md and "41.5%" in md


def test_seeds_that_ranked_different_queries_are_refused():
    runs = B.BenchmarkRuns()
    runs.add("default", 0, "photochat", {"dialog_to_image": B.QueryRanks(np.array([1, 2]), ["a", "b"], 2)})
    runs.add("default", 1, "photochat", {"dialog_to_image": B.QueryRanks(np.array([1, 2]), ["a", "c"], 2)})
    with pytest.raises(ValueError, match="other queries"):
        runs.matrix(("default", "photochat", "dialog_to_image"))


def test_a_missing_preset_is_a_clear_error(monkeypatch):
    from dialclip_ray.model import config

    monkeypatch.setattr(config, "PRESETS", {k: v for k, v in config.PRESETS.items() if k != "ungated"})
    with pytest.raises(SystemExit, match="'ungated'.*PRESETS"):
        B.check_variant("ungated")
    B.check_variant("default")


def test_first_dialogs_keeps_whole_conversations():
    from types import SimpleNamespace

    recs = [SimpleNamespace(id=f"mmdialog/test/{c}/{t}/0") for c in (1, 2, 3) for t in range(1, 5)]
    assert B.first_dialogs(recs, None) == recs and B.first_dialogs(recs, 100) == recs
    assert [r.id for r in B.first_dialogs(recs, 5)] == [r.id for r in recs[:8]]  # conversation 2 kept whole
    assert len(B.first_dialogs(recs, 4)) == 4 and len(B.first_dialogs(recs, 1)) == 4


def test_committed_results_hold_no_absolute_paths():
    """Results files are read on other machines: paths in them are repo-relative or placeholders."""
    import re
    from pathlib import Path

    results = Path(__file__).resolve().parents[1] / "bench" / "results"
    pattern = re.compile(r'"(/(?:home|root|tmp|work|Users|var|mnt|opt)/[^"]*)"')
    offenders = {f.name: pattern.findall(f.read_text(errors="replace"))[:3]
                 for f in sorted(results.glob("*")) if f.suffix in (".json", ".md", ".yaml")}
    assert not {k: v for k, v in offenders.items() if v}


def test_attribute_agreement_says_which_attributes_the_top1_photo_gets_right(tmp_path):
    truth = {"attributes": ["colour", "shape", "count"],
             "photochat": {"a": ["red", "dog", 1], "b": ["red", "cat", 1], "c": ["blue", "cat", 2]}}
    (tmp_path / "synth_truth.json").write_text(json.dumps(truth))
    qr = B.QueryRanks(np.array([1, 2, 3]), ["q0", "q1", "q2"], 3, target_ids=["a", "a", "b"],
                      top1_ids=["a", "b", "c"])
    out = B.attribute_agreement(tmp_path / "synth_truth.json", qr)
    assert out["queries"] == 3 and out["misses"] == 2
    assert out["all_queries"] == {"colour": pytest.approx(66.67), "shape": pytest.approx(66.67),
                                  "count": pytest.approx(66.67)}
    assert out["misses_only"] == {"colour": 50.0, "shape": 50.0, "count": 50.0}
    assert B.attribute_agreement(tmp_path / "synth_truth.json", B.QueryRanks(np.array([1]), ["q"], 1)) == {}


def test_proxy_configs_are_absolute_and_named_the_same_from_any_directory(tmp_path, monkeypatch):
    """Tune runs each trial in its own working directory: relative paths would land the proxy runs there."""
    from dialclip_ray.model.config import preset
    from dialclip_ray.train.config import DataSection, RunSection, TrainConfig

    def make_config(variant, lr, proxy=False):
        return TrainConfig(model=preset(variant), data=DataSection(train=["runs/cache/corpus/photochat"]),
                           run=RunSection(name=f"{variant}-x", storage_path="runs/cache/bench_lr"))

    names = []
    for here in ("a", "b"):
        (tmp_path / here).mkdir()
        monkeypatch.chdir(tmp_path / here)
        name, configs = B.proxy_configs(["finetune", "default"], make_config, (5e-5, 5e-4))
        names.append(name)
        assert sorted(configs) == ["default@0.0005", "default@5e-05", "finetune@0.0005", "finetune@5e-05"]
        for cfg in configs.values():
            assert cfg["run"]["storage_path"] == str(tmp_path / here / "runs/cache/bench_lr")
            assert cfg["data"]["train"] == [str(tmp_path / here / "runs/cache/corpus/photochat")]
    assert names[0] == names[1]
