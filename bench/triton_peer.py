"""Triton, the peer of `make bench`: tritonserver 2.51 from the
nvidia-pytriton wheel with its Python backend running the models on
onnxruntime (bench/triton/model.py), as documented in docs/benchmarks.md."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTRITON_VERSION = "0.7.0"  # ships tritonserver 2.51 with the Python backend
TRITON_REQUIREMENTS = ROOT / "bench" / "triton" / "requirements.txt"


def log(message: str) -> None:
    print(f"==> {message}", flush=True)


def setup(cache: Path, py: Path, requirements: Path = TRITON_REQUIREMENTS, venv_name: str = "triton-venv",
          find_links: Path | None = None) -> dict:
    """tritonserver from the nvidia-pytriton wheel (downloaded once, unpacked,
    run in place), the Python backend with the stub for this Python, and a
    virtualenv with numpy < 2 and onnxruntime for the model (`requirements`;
    bench/gpu's has onnxruntime-gpu, found among the CUDA image's wheels in
    `find_links`)."""
    wheels = cache / "wheels"
    wheel = next(iter(wheels.glob(f"nvidia_pytriton-{PYTRITON_VERSION}-*.whl")), None)
    if wheel is None:
        log(f"downloading nvidia-pytriton {PYTRITON_VERSION} (55 MB, once)")
        subprocess.run(
            [str(py), "-m", "pip", "download", "--no-deps", "--progress-bar", "off", "-d", str(wheels),
             f"nvidia-pytriton=={PYTRITON_VERSION}"],
            check=True,
        )
        wheel = next(wheels.glob(f"nvidia_pytriton-{PYTRITON_VERSION}-*.whl"))
    unpacked = cache / f"pytriton-{PYTRITON_VERSION}"
    if not (unpacked / ".unpacked").exists():
        log(f"unpacking {wheel.name}")
        shutil.rmtree(unpacked, ignore_errors=True)
        import zipfile

        with zipfile.ZipFile(wheel) as z:
            z.extractall(unpacked)
        (unpacked / ".unpacked").touch()
    home = unpacked / "pytriton" / "tritonserver"
    binary = home / "bin" / "tritonserver"
    binary.chmod(0o755)
    pyver = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = home / "python_backend_stubs" / pyver / "triton_python_backend_stub"
    if not stub.exists():
        raise SystemExit(f"the nvidia-pytriton wheel has no Python backend stub for Python {pyver}")
    backends = cache / "triton-backends"
    python_backend = backends / "python"
    python_backend.mkdir(parents=True, exist_ok=True)
    for f in [home / "backends" / "python" / "libtriton_python.so", stub]:
        shutil.copy2(f, python_backend / f.name)
    (python_backend / "triton_python_backend_stub").chmod(0o755)

    venv = cache / venv_name
    stamp = hashlib.sha256(requirements.read_bytes()).hexdigest()
    marker = venv / ".installed"
    if not marker.exists() or marker.read_text() != stamp:
        log(f"building {venv.relative_to(ROOT)} ({requirements.relative_to(ROOT)}: numpy<2, onnxruntime)")
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable if sys.version_info[:2] == (3, 11) else "python3", "-m", "venv", str(venv)],
                       check=True)
        links = ["--find-links", str(find_links)] if find_links else []
        subprocess.run([str(venv / "bin" / "pip"), "install", "--progress-bar", "off", "-q", *links,
                        "-r", str(requirements)], check=True)
        marker.write_text(stamp)
    site = next((venv / "lib").glob("python3*/site-packages"))
    # The stub embeds the system's libpython in isolated mode (PYTHONPATH is
    # ignored) and imports triton_python_backend_utils, which imports numpy,
    # before any model.py: the copy in our backend directory puts the
    # virtualenv first on sys.path.
    utils = (home / "backends" / "python" / "triton_python_backend_utils.py").read_text()
    (python_backend / "triton_python_backend_utils.py").write_text(
        f"import sys\nsys.path.insert(0, {str(site)!r})  # added by ferrite's bench/triton_peer.py\n" + utils)
    return {"binary": binary, "libs": unpacked / "nvidia_pytriton.libs", "backends": backends, "site": site}


TRITON_TYPES = {"tensor(float)": "TYPE_FP32", "tensor(string)": "TYPE_STRING", "tensor(bool)": "TYPE_BOOL",
                "tensor(int64)": "TYPE_INT64", "tensor(int32)": "TYPE_INT32", "tensor(double)": "TYPE_FP64"}


def repository(repo: Path, models: dict[str, tuple[Path, tuple[list, list], int]], threads: int, site: Path,
               providers: str = "CPUExecutionProvider") -> None:
    """A Triton model repository: each model (its ONNX path, signature and
    largest batch) served by bench/triton/model.py on onnxruntime with
    `providers` (comma-separated), with dynamic batching."""
    for name, (path, (inputs, outputs), max_batch) in models.items():

        def tensors(values):
            out = []
            for tname, ttype, shape in values:
                dims = shape[1:] or [1]  # Triton's batch dimension is implicit
                out.append(f'  {{ name: "{tname}" data_type: {TRITON_TYPES[ttype]} dims: {dims} }}')
            return ",\n".join(out)

        d = repo / name
        (d / "1").mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / "bench" / "triton" / "model.py", d / "1" / "model.py")
        params = {"onnx_path": str(path), "intra_op_threads": str(threads), "venv_site_packages": str(site),
                  "providers": providers}
        (d / "config.pbtxt").write_text(
            f'name: "{name}"\nbackend: "python"\nmax_batch_size: {max_batch}\n'
            f"input [\n{tensors(inputs)}\n]\noutput [\n{tensors(outputs)}\n]\n"
            "dynamic_batching { }\n"
            'instance_group [ { count: 1 kind: KIND_CPU } ]\n'
            + "".join(f'parameters: {{ key: "{k}" value: {{ string_value: "{v}" }} }}\n' for k, v in params.items())
        )
