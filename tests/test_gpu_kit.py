"""The GPU kit (bench/gpu_kit.py) and the FAISS stand-in of bench/gpu_ray_check.py.

Fast tests: slimming a small fake wheel (dropped paths, RECORD, permissions, pip installs it),
the dependency plan for the GPU host, the FAISS stand-in against FAISS and inside the sharded
index. The slow test does on this machine's Python what the GPU host does with the real kit:
slim this Python's Ray wheel from the package registry, install the kit with pip into a clean
venv whose only other packages are those the GPU image has (linked file by file from .venv),
and run a Ray task and a one-worker Ray Train step there. It skips when the registry is
unreachable.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata as md
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
MIB = 1 << 20


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def kit():
    return _load("gpu_kit")


def _hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _fake_ray_wheel(path: Path) -> Path:
    """A small wheel laid out like Ray's: a jar, source maps, RLlib, a binary, the dashboard build."""
    files = {
        "ray/__init__.py": b"__version__ = '0.0.1'\n",
        "ray/jars/ray_dist.jar": os.urandom(4096),
        "ray/dashboard/__init__.py": b"",
        "ray/dashboard/http_server_head.py": b"# server\n",
        "ray/dashboard/client/build/index.html": b"<html></html>",
        "ray/dashboard/client/build/static/js/main.js": b"console.log(1)",
        "ray/dashboard/client/build/static/js/main.js.map": b"{}" * 100,
        "ray/rllib/__init__.py": b"",
        "ray/core/src/ray/raylet/raylet": b"\x7fELF-not-really",
        "ray-0.0.1.dist-info/METADATA": b"Metadata-Version: 2.1\nName: ray\nVersion: 0.0.1\n",
        "ray-0.0.1.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: false\nTag: py3-none-any\n",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        rows = []
        for name, data in files.items():
            info = zipfile.ZipInfo(name, (2020, 1, 1, 0, 0, 0))
            info.external_attr = (0o100755 if name.endswith("raylet") else 0o100644) << 16  # regular files
            z.writestr(info, data)
            rows.append(f"{name},{_hash(data)},{len(data)}")
        rows.append("ray-0.0.1.dist-info/RECORD,,")
        z.writestr("ray-0.0.1.dist-info/RECORD", "\n".join(rows) + "\n")
    return path


def test_slim_wheel_drops_unused_files_and_rewrites_record(kit, tmp_path):
    src = _fake_ray_wheel(tmp_path / "src" / "ray-0.0.1-py3-none-any.whl")
    rep = kit.slim_wheel(src, tmp_path / "out")
    out = Path(rep.output)
    assert out.name == src.name and out.parent == tmp_path / "out"
    with zipfile.ZipFile(out) as z:
        names = set(z.namelist())
        mode = z.getinfo("ray/core/src/ray/raylet/raylet").external_attr >> 16
        slim = json.loads(z.read("ray-0.0.1.dist-info/slim.json"))
    assert not any(n.startswith(("ray/jars/", "ray/rllib/")) or n.endswith(".map") for n in names)
    assert {"ray/dashboard/client/build/index.html", "ray/dashboard/client/build/static/js/main.js",
            "ray/dashboard/http_server_head.py", "ray/__init__.py"} <= names
    assert mode & 0o111, "executables keep their exec bit"
    assert rep.dropped_files == 3 and slim["dropped_files"] == 3
    assert kit.check_record(out) == []
    assert kit.check_record(src) == []


def test_check_record_finds_a_changed_file(kit, tmp_path):
    src = _fake_ray_wheel(tmp_path / "ray-0.0.1-py3-none-any.whl")
    bad = tmp_path / "bad" / src.name
    bad.parent.mkdir()
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(bad, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            zout.writestr(info, b"changed\n" if info.filename == "ray/__init__.py" else data)
        zout.writestr("ray/extra.py", b"")
    problems = kit.check_record(bad)
    assert any("ray/__init__.py: hash mismatch" in p for p in problems)
    assert any("ray/extra.py is not in RECORD" in p for p in problems)


def test_slim_wheel_installs_with_pip(kit, tmp_path):
    src = _fake_ray_wheel(tmp_path / "src" / "ray-0.0.1-py3-none-any.whl")
    out = Path(kit.slim_wheel(src, tmp_path / "out").output)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--disable-pip-version-check", "--target", str(target), str(out)], check=True)
    assert (target / "ray" / "dashboard" / "client" / "build" / "index.html").is_file()
    assert not (target / "ray" / "jars").exists()
    assert os.access(target / "ray" / "core" / "src" / "ray" / "raylet" / "raylet", os.X_OK)
    record = (target / "ray-0.0.1.dist-info" / "RECORD").read_text()
    assert "slim.json" in record and "ray_dist.jar" not in record


def test_kit_plan_for_the_gpu_image(kit):
    plan = kit.plan("3.12", "image", [], [], md.version("ray"))
    carry = {i.name for i in plan.carry}
    dropped = {d["name"] for d in plan.dropped}
    on_host = {h["name"] for h in plan.host}
    # what Ray's dashboard/Serve and this project need and the image lacks
    assert {"pydantic", "pydantic-core", "fastapi", "starlette", "uvicorn", "open-clip-torch", "ftfy",
            "opencensus", "aiohttp-cors", "opentelemetry-sdk", "jsonschema"} <= carry
    assert {"faiss-gpu", "virtualenv", "py-spy", "google-auth"} <= dropped
    assert not carry & {"torch", "numpy", "pyarrow", "pandas", "torchvision", "faiss-gpu", "cryptography"}
    assert {"torch", "numpy", "pyarrow", "pandas", "aiohttp"} <= on_host
    assert "grpcio" in carry and "grpcio" not in on_host  # FORCE_CARRY: grpcio-reflection pins its floor
    assert "ray" not in carry  # the slim wheel is added by build_kit


def _shim_module():
    shim = types.ModuleType("faiss_shim_under_test")
    exec(_load("gpu_ray_check").FAISS_SHIM, shim.__dict__)
    return shim


def test_faiss_stand_in_matches_faiss():
    faiss = pytest.importorskip("faiss")
    shim = _shim_module()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 32)).astype(np.float32)
    q = rng.standard_normal((7, 32)).astype(np.float32)
    for mod in (faiss, shim):
        mod.normalize_L2(x)
        mod.normalize_L2(q)
    ref, ours = faiss.IndexFlatIP(32), shim.IndexFlatIP(32)
    ref.add(x)
    ours.add(x)
    assert ours.ntotal == ref.ntotal and ours.d == ref.d and ours.metric_type == shim.METRIC_INNER_PRODUCT
    D1, I1 = ref.search(q, 510)  # k > ntotal: the tail is (-FLT_MAX, -1) in both
    D2, I2 = ours.search(q, 510)
    np.testing.assert_array_equal(I1, I2)
    np.testing.assert_allclose(D1, D2, rtol=1e-5, atol=1e-5)
    # merging shard answers
    halves = [(x[:250], 0), (x[250:], 250)]
    heaps = [faiss.ResultHeap(7, 10, keep_max=True), shim.ResultHeap(7, 10, keep_max=True)]
    for part, offset in halves:
        for mod, heap in zip((faiss, shim), heaps):
            idx = mod.IndexFlatIP(32)
            idx.add(part)
            d, i = idx.search(q, 10)
            heap.add_result(d, np.where(i >= 0, i + offset, -1))
    for heap in heaps:
        heap.finalize()
    np.testing.assert_array_equal(heaps[0].I, heaps[1].I)
    np.testing.assert_array_equal(heaps[1].I, I1[:, :10])


def test_faiss_stand_in_serves_a_sharded_index(tmp_path):
    """build_sharded_index + ShardedIndex with the stand-in importable as ``faiss`` (as on the GPU host)."""
    check = _load("gpu_ray_check")
    shim_dir = tmp_path / "shim"
    (shim_dir / "faiss").mkdir(parents=True)
    (shim_dir / "faiss" / "__init__.py").write_text(check.FAISS_SHIM)
    script = f"""
import numpy as np, faiss
assert getattr(faiss, "IS_DIALCLIP_SHIM", False), faiss.__file__
from dialclip_ray.index.shards import ShardedIndex, build_sharded_index
rng = np.random.default_rng(1)
x = rng.standard_normal((300, 16)).astype(np.float32)
ids = [f"v{{i}}" for i in range(300)]
build_sharded_index(ids, x, {str(tmp_path / 'idx')!r}, shards=3, kind="flat")
index = ShardedIndex({str(tmp_path / 'idx')!r}, use_gpu=False)
q = rng.standard_normal((5, 16)).astype(np.float32)
hits = index.search(q, 8)
xn = x / np.linalg.norm(x, axis=1, keepdims=True)
qn = q / np.linalg.norm(q, axis=1, keepdims=True)
expect = np.argsort(-(qn @ xn.T), axis=1, kind="stable")[:, :8]
assert (hits.labels == expect).all(), (hits.labels, expect)
assert hits.ids[0, 0] == ids[expect[0, 0]]
print("ok")
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shim_dir), str(REPO)])}
    out = subprocess.run([sys.executable, "-c", script], check=False, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


# ------------------------------------------------------------------------------------------------
# slow: the real Ray wheel, slimmed, in a clean environment
# ------------------------------------------------------------------------------------------------
def _registry_reachable(tmp: Path) -> str | None:
    """None if pip can download from the package registry, else why not."""
    probe = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                            "--no-cache-dir", "-d", str(tmp / "probe"), f"packaging=={md.version('packaging')}"],
                           check=False, capture_output=True, text=True, timeout=120)
    return None if probe.returncode == 0 else (probe.stderr.strip().splitlines() or ["pip download failed"])[-1]


def _link_host_packages(dest: Path, host_names: set[str]) -> int:
    """Symlink, file by file, every distribution of this environment that the GPU image also has."""
    linked = 0
    for dist in md.distributions():
        name = canonicalize_name(dist.metadata["Name"] or "")
        if not (name in host_names or name.startswith(("nvidia-", "cuda-"))) or not dist.files:
            continue
        for f in dist.files:
            if f.parts[0] == ".." or "__pycache__" in f.parts:
                continue
            src = Path(dist.locate_file(f))
            target = dest / f
            if src.is_file() and not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                target.symlink_to(src)
                linked += 1
    return linked


CLEAN_ENV_SCRIPT = r"""
import importlib.metadata as md, json, sys, time
t0 = time.time()
import ray
assert ray.__file__.startswith(sys.prefix), f"ray from {ray.__file__}, not the clean venv {sys.prefix}"
files = [str(f) for f in md.distribution("ray").files]
assert not any(f.startswith("ray/jars/") or f.endswith(".map") for f in files)
assert any(f.endswith(".dist-info/slim.json") for f in files)
for name in ("faiss", "virtualenv", "google.auth"):
    try:
        __import__(name)
        raise AssertionError(f"{name} is importable: the environment is not clean")
    except ImportError:
        pass
import ray.data, ray.train.torch, ray.tune, ray.serve, fastapi, uvicorn, open_clip, pydantic  # noqa
import dialclip_ray, dialclip_ray.train.run, dialclip_ray.evaluation.distributed, dialclip_ray.serving.schemas  # noqa
assert dialclip_ray.__file__.startswith(sys.prefix), dialclip_ray.__file__
for attempt in range(3):  # Ray gives its raylet a fixed 30 s to register: a loaded machine can miss it
    try:
        ray.init(address="local", num_cpus=2, include_dashboard=True, log_to_driver=False)
        break
    except Exception:
        ray.shutdown()
        if attempt == 2:
            raise

@ray.remote
def double(x):
    return 2 * x

assert ray.get(double.remote(21)) == 42
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

def loop(config):
    import os, tempfile
    import torch
    import ray.train
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(32, 4)
    loss = ((model(x) - x.sum(1, keepdim=True)) ** 2).mean()
    opt.zero_grad(); loss.backward(); opt.step()
    with tempfile.TemporaryDirectory() as tmp:  # Train V2 keeps only metrics reported with a checkpoint
        torch.save(model.state_dict(), os.path.join(tmp, "model.pt"))
        ray.train.report({"loss": float(loss), "rank": ray.train.get_context().get_world_rank()},
                         checkpoint=ray.train.Checkpoint.from_directory(tmp))

result = TorchTrainer(loop, scaling_config=ScalingConfig(num_workers=1),
                      run_config=RunConfig(name="kit-check", storage_path=sys.argv[1])).fit()
assert result.error is None and result.checkpoint is not None and "loss" in (result.metrics or {}), result
ray.shutdown()
print(json.dumps({"ok": True, "ray": ray.__version__, "loss": result.metrics["loss"],
                  "seconds": round(time.time() - t0, 1)}))
"""


@pytest.mark.slow
def test_slim_ray_kit_runs_ray_and_train_in_a_clean_env(kit, tmp_path):
    why = _registry_reachable(tmp_path)
    if why is not None:
        pytest.skip(f"package registry unreachable: {why}")
    import time

    t0, timings = time.time(), {}
    pyver = f"{sys.version_info.major}.{sys.version_info.minor}"
    out = tmp_path / "kit"
    # strip="yes": the riskier variant (rewritten binaries); unstripped files are the original bytes
    # the shipped compression level: whether the kit fits the device budget is a fact about what ships
    report = kit.build_kit(out, tmp_path / "cache", python_version=pyver, host="image", strip="yes")
    assert report["fits"], f"kit {report['kit_mib']} MiB > budget {report['kit_budget_bytes'] / MIB:.1f} MiB"
    ray_whl = out / next(w["wheel"] for w in report["wheels"] if w["name"] == "ray")
    timings["build_kit"] = time.time() - t0
    assert kit.check_record(ray_whl) == []
    with zipfile.ZipFile(ray_whl) as z:
        names = set(z.namelist())
    assert not any(n.startswith("ray/jars/") or n.endswith(".map") for n in names)
    assert "ray/dashboard/client/build/index.html" in names and "ray/_raylet.so" in names
    assert ray_whl.stat().st_size < 45 * MIB

    # A venv of the base interpreter (no system site), plus the GPU image's packages linked from .venv.
    host = tmp_path / "host-site"
    assert _link_host_packages(host, kit.host_packages("image")[0]) > 1000
    venv = tmp_path / "venv"
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True)
    vpy = venv / "bin" / "python"
    site = Path(subprocess.run([str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "zz_gpu_image.pth").write_text(f"import site; site.addsitedir({str(host)!r})\n")
    timings["host_site_and_venv"] = time.time() - t0 - sum(timings.values())
    wheels = sorted(str(p) for p in out.glob("*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "--python", str(vpy), "install", "-q", "--no-index", "--no-deps",
                    "--disable-pip-version-check", *wheels], check=True, timeout=600)  # compiled once, here

    timings["pip_install"] = time.time() - t0 - sum(timings.values())
    ray_tmp = tempfile.mkdtemp(prefix="rk", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"),
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_TRAIN_V2_ENABLED": "1", "RAY_TMPDIR": ray_tmp,
           "OMP_NUM_THREADS": "1", "LANG": "C.UTF-8"}
    try:
        run = subprocess.run([str(vpy), "-c", CLEAN_ENV_SCRIPT, str(tmp_path / "train")], check=False, cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=600)  # ~70 s on the shared 2-core box
    finally:
        subprocess.run(["rm", "-rf", ray_tmp], check=False)
    timings["ray_task_and_train"] = time.time() - t0 - sum(timings.values())
    print("phases (s):", {k: round(v, 1) for k, v in timings.items()}, "kit MiB:", report["kit_mib"])
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert json.loads(run.stdout.strip().splitlines()[-1])["ok"]
