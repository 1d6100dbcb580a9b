"""Tests of the image writer and its checker (no container runtime needed).

    .venv/bin/python -m pytest -q images/test_images.py

A small image around a host executable (/usr/bin/true) is built twice and
checked; broken images must be refused; its SBOM (sbom.py) must list the crates,
the Debian packages and ONNX Runtime. When `make images` has written the real
archives, they and their SBOMs are checked too (skipped otherwise; `make test`
runs the rest, see test-python in the Makefile).
"""

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import check  # noqa: E402

BUILD = [sys.executable, os.path.join(HERE, "build-oci.py")]
TRUE = shutil.which("true")


def build(out, *extra, elf=True):
    cmd = BUILD + [
        "--ref", "docker.io/library/ferrite-test:1", "-o", str(out),
        ("--elf" if elf else "--file"), f"{TRUE}:/usr/bin/app",
        "--entrypoint", "/usr/bin/app",
        "--label", "org.opencontainers.image.version=1",
        "--label", "org.opencontainers.image.revision=0000000",
        *extra,
    ]
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "SOURCE_DATE_EPOCH": "1700000000"})
    return str(out)


def rewrite(src, dst, change):
    """Copy an archive, passing each member's bytes through change(name, data)."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for m in tin.getmembers():
            data = tin.extractfile(m).read() if m.isfile() else None
            if data is not None:
                data = change(m.name, data)
                m.size = len(data)
            tout.addfile(m, io.BytesIO(data) if data is not None else None)
    return str(dst)


def test_small_image_passes_and_is_reproducible(tmp_path):
    a = build(tmp_path / "a.tar", "--expose", "8000")
    b = build(tmp_path / "b.tar", "--expose", "8000")
    fails, summary = check.check_archive(a, [("/usr/bin/app", TRUE)])
    assert not fails, fails
    assert summary["user"] == "65532:65532"
    assert summary["exposed"] == ["8000/tcp"]
    assert "/usr/bin/app" in summary["elf_files"]
    assert any(p.endswith("/libc.so.6") for p in summary["paths"])
    assert check.digests(a) == check.digests(b)
    with open(a, "rb") as fa, open(b, "rb") as fb:
        assert fa.read() == fb.read()  # byte for byte


def test_layer_cache_gives_the_same_bytes(tmp_path):
    cache = tmp_path / "layers"
    plain = build(tmp_path / "plain.tar")
    first = build(tmp_path / "first.tar", "--layer-cache", str(cache))
    cached = sorted(os.listdir(cache))
    assert cached and all(name.endswith(".9.gz") for name in cached)
    again = build(tmp_path / "again.tar", "--layer-cache", str(cache))
    assert sorted(os.listdir(cache)) == cached  # reused, nothing new
    with open(plain, "rb") as a, open(first, "rb") as b, open(again, "rb") as c:
        assert a.read() == b.read() == c.read()


def test_layout_and_names(tmp_path):
    a = build(tmp_path / "a.tar")
    files = check.read_archive(a)
    assert json.loads(files["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads(files["index.json"])
    ann = index["manifests"][0]["annotations"]
    assert ann["org.opencontainers.image.ref.name"] == "docker.io/library/ferrite-test:1"
    assert json.loads(files["manifest.json"])[0]["RepoTags"] == ["docker.io/library/ferrite-test:1"]
    with tarfile.open(a) as tar:
        names = tar.getnames()
    assert names == sorted(names)


def test_missing_libraries_are_found(tmp_path):
    # --file copies the executable without its libraries: the check must say so.
    a = build(tmp_path / "a.tar", elf=False)
    fails, _ = check.check_archive(a)
    assert any("needs libc.so.6" in f for f in fails), fails
    assert any("interpreter" in f for f in fails), fails


def test_tampered_blob_is_refused(tmp_path):
    a = build(tmp_path / "a.tar")
    index = json.loads(check.read_archive(a)["index.json"])
    mf = "blobs/sha256/" + index["manifests"][0]["digest"].split(":")[1]
    bad = rewrite(a, tmp_path / "bad.tar", lambda n, d: d + b" " if n == mf else d)
    fails, _ = check.check_archive(bad)
    assert any("has digest" in f for f in fails), fails


def test_root_user_is_refused(tmp_path):
    a = build(tmp_path / "a.tar", "--user", "0:0")
    fails, _ = check.check_archive(a)
    assert any("User is '0:0'" in f for f in fails), fails


def test_a_shell_is_refused(tmp_path):
    a = build(tmp_path / "a.tar", "--file", f"{TRUE}:/bin/sh")
    fails, _ = check.check_archive(a)
    assert any("/bin/sh exists" in f for f in fails), fails


@pytest.mark.parametrize("name,binary", [("ferrite-server", "ferrite-server"), ("ferrite-operator", "ferrite-operator")])
def test_built_images(name, binary):
    archive = os.path.join(ROOT, ".cache", "images", f"{name}.oci.tar")
    host = os.path.join(ROOT, "target", "release", binary)
    if not os.path.exists(archive):
        pytest.skip(f"{archive} not built (make images)")
    pairs = [(f"/usr/bin/{binary}", host)]
    if name == "ferrite-server":
        pairs.append(("/usr/lib/ferrite/libonnxruntime.so", os.path.join(ROOT, ".cache", "onnxruntime", "libonnxruntime.so")))
    fails, summary = check.check_archive(archive, pairs)
    assert not fails, fails
    assert summary["entrypoint"] == [f"/usr/bin/{binary}"]
    if name == "ferrite-server":
        assert "ORT_DYLIB_PATH=/usr/lib/ferrite/libonnxruntime.so" in summary["env"]
        assert summary["exposed"] == ["8000/tcp", "8001/tcp", "8002/tcp"]
    # make images writes the SBOM beside the archive.
    with open(archive.replace(".oci.tar", ".cdx.json")) as f:
        names = {c["name"] for c in json.load(f)["components"]}
    assert {binary, "tokio", "libc6"} <= names
    if name == "ferrite-server":
        assert "onnxruntime" in names


SBOM = [sys.executable, os.path.join(HERE, "sbom.py")]
ORT_IN_IMAGE = "/usr/lib/ferrite/libonnxruntime.so"


def sbom(archive, out, *extra):
    subprocess.run(
        SBOM + [str(archive), "-o", str(out), "--name", "ferrite-test", "--version", "1", *extra],
        check=True, capture_output=True, env={**os.environ, "SOURCE_DATE_EPOCH": "1700000000"},
    )
    with open(out) as f:
        return json.load(f)


def test_sbom_lists_crates_system_libraries_and_onnxruntime(tmp_path):
    # The test image: /usr/bin/true as the "ferrite-server" binary (its libraries
    # come from this machine's Debian packages) and a stand-in ONNX Runtime.
    lib = tmp_path / "libonnxruntime.so"
    lib.write_bytes(b"\x7fELF stand-in")
    a = build(tmp_path / "a.tar", "--file", f"{lib}:{ORT_IN_IMAGE}")
    report = tmp_path / "pip-report.json"
    report.write_text(json.dumps({"install": [{
        "metadata": {"name": "onnxruntime", "version": "1.31.1"},
        "download_info": {"url": "https://example.invalid/onnxruntime-1.31.1-cp311-cp311-manylinux_2_28_x86_64.whl",
                          "archive_info": {"hashes": {"sha256": "ab" * 32}}},
    }]}))
    args = ["--cargo", "/usr/bin/app=ferrite-server", "--pypi", f"{ORT_IN_IMAGE}=onnxruntime==1.31.1",
            "--pip-report", str(report)]
    bom = sbom(a, tmp_path / "a.cdx.json", *args)

    assert (bom["bomFormat"], bom["specVersion"]) == ("CycloneDX", "1.5")
    by_name = {c["name"]: c for c in bom["components"]}
    tokio = by_name["tokio"]
    assert tokio["purl"] == f"pkg:cargo/tokio@{tokio['version']}"
    assert len(tokio["hashes"][0]["content"]) == 64  # the checksum from Cargo.lock
    assert tokio["licenses"][0]["expression"]
    assert by_name["ferrite-server"]["type"] == "application"
    assert "proc-macro2" not in by_name  # build-time only, not linked

    libc_version = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "libc6"],
                                  check=True, capture_output=True, text=True).stdout
    libc6 = by_name["libc6"]
    assert libc6["version"] == libc_version
    assert libc6["purl"].startswith("pkg:deb/debian/libc6@")
    libc_files = [p["value"] for p in libc6["properties"] if p["name"] == "ferrite:file"]
    assert any(v.split()[0].endswith("/libc.so.6") for v in libc_files), libc_files

    ort = by_name["onnxruntime"]
    assert ort["purl"] == "pkg:pypi/onnxruntime@1.31.1"
    props = {p["name"]: p["value"] for p in ort["properties"]}
    assert props["ferrite:file"].startswith(f"{ORT_IN_IMAGE} sha256:")
    assert props["ferrite:wheel"] == "onnxruntime-1.31.1-cp311-cp311-manylinux_2_28_x86_64.whl"
    assert props["ferrite:wheel-sha256"] == "ab" * 32

    # Every regular file of the image is in exactly one component.
    listed = [p["value"].split()[0] for c in bom["components"] for p in c.get("properties", [])
              if p["name"] == "ferrite:file"] + [c["name"] for c in bom["components"] if c["type"] == "file"]
    assert len(listed) == len(set(listed))
    assert {"/etc/passwd", "/etc/ssl/certs/ca-certificates.crt", "/usr/bin/app", ORT_IN_IMAGE} <= set(listed)

    # Deterministic: the same image gives the same bytes.
    again = sbom(a, tmp_path / "b.cdx.json", *args)
    assert again == bom


def test_dockerfiles_pin_base_images_by_digest():
    import re

    pinned = re.compile(r"^FROM\s+\S+@sha256:[0-9a-f]{64}(\s+AS\s+\S+)?$", re.IGNORECASE)
    froms = []
    for name in ("server", "operator"):
        with open(os.path.join(HERE, name, "Dockerfile")) as f:
            for line in f:
                if line.upper().startswith("FROM "):
                    froms.append(line.strip())
    assert len(froms) == 5, froms
    for line in froms:
        assert pinned.match(line), f"not pinned by digest: {line}"


# The ferrite-server-cuda image (docs/gpu.md): built as `make images` builds it
# (here from the debug server binary, into a temporary directory), then its
# libraries are resolved by the image's own loader inside its extracted root
# filesystem. Only libcuda.so.1 may be missing: the NVIDIA container runtime
# mounts the driver's into GPU pods. The wheels (~1.6 GB) are downloaded once
# into .cache/cuda/wheels.
CUDA_LIBRARIES = {
    "libonnxruntime.so", "libonnxruntime_providers_shared.so", "libonnxruntime_providers_cuda.so",
    "libcudart.so.13", "libcublas.so.13", "libcublasLt.so.13", "libcurand.so.10", "libcufft.so.12",
    "libnvrtc.so.13", "libnvrtc-builtins.so.13.0",
    *(f"libcudnn{p}.so.9" for p in ("", "_adv", "_cnn", "_engines_precompiled", "_engines_runtime_compiled",
                                      "_engines_tensor_ir", "_ext", "_graph", "_heuristic", "_ops")),
}


def test_cuda_image_builds_and_its_libraries_resolve(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}
    # IMAGES_TEST_MAKE_ARGS: more make arguments, e.g. `-o images-release` to
    # pack the debug binary already built without asking cargo again.
    extra = os.environ.get("IMAGES_TEST_MAKE_ARGS", "").split()
    done = subprocess.run(
        ["make", "--no-print-directory", *extra, "images-cuda", "IMAGE_PROFILE=debug", f"IMAGES_OUT={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=3600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    archive = tmp_path / "ferrite-server-cuda.oci.tar"
    provider = "/usr/lib/ferrite/libonnxruntime_providers_cuda.so"
    fails, summary = check.check_archive(
        str(archive), allow_missing=("libcuda.so.1",),
        ldd_in_root=(provider, "/usr/lib/ferrite/libonnxruntime.so", "/usr/bin/ferrite-server"),
    )
    assert not fails, fails
    libs = {p.rsplit("/", 1)[1] for p in summary["paths"] if p.startswith("/usr/lib/ferrite/")}
    assert libs == CUDA_LIBRARIES, libs ^ CUDA_LIBRARIES  # nothing missing, nothing else
    assert not any("tensorrt" in p or "libnvinfer" in p for p in summary["paths"])
    env_vars = dict(e.split("=", 1) for e in summary["env"])
    assert env_vars["ORT_DYLIB_PATH"] == "/usr/lib/ferrite/libonnxruntime.so"
    assert env_vars["LD_LIBRARY_PATH"] == "/usr/lib/ferrite"
    assert summary["entrypoint"] == ["/usr/bin/ferrite-server"] and summary["user"] == "65532:65532"

    # ldd inside the image: the CUDA provider's libraries come from the image,
    # the driver's libcuda.so.1 alone is not found.
    lines = summary["ldd"][provider]
    resolved = {line.split()[0]: line for line in lines if "=>" in line}
    for soname in ("libcudart.so.13", "libcublas.so.13", "libcublasLt.so.13", "libcurand.so.10", "libstdc++.so.6"):
        assert soname in resolved and "not found" not in resolved[soname], lines
    assert [line.split()[0] for line in lines if "not found" in line] == ["libcuda.so.1"], lines
    assert not any("not found" in line for line in summary["ldd"]["/usr/bin/ferrite-server"])

    # The SBOM: each wheel with its hash, the crates, the Debian libraries.
    with open(str(archive).replace(".oci.tar", ".cdx.json")) as f:
        bom = json.load(f)
    by_name = {c["name"]: c for c in bom["components"]}
    with open(os.path.join(HERE, "cuda", "requirements.txt")) as f:
        pinned = dict(line.split()[0].split("==") for line in f if "==" in line and not line.startswith(" "))
    for wheel, version in pinned.items():
        component = by_name[wheel]
        assert component["version"] == version and component["purl"] == f"pkg:pypi/{wheel}@{version}"
        props = {p["name"]: p["value"] for p in component["properties"] if p["name"] != "ferrite:file"}
        assert len(props["ferrite:wheel-sha256"]) == 64 and props["ferrite:wheel"].endswith(".whl")
    assert {"ferrite-server", "tokio", "libc6"} <= set(by_name)
    files = [p["value"].split()[0] for c in bom["components"] for p in c.get("properties", [])
             if p["name"] == "ferrite:file"]
    assert len(files) == len(set(files))
    assert {f"/usr/lib/ferrite/{lib}" for lib in CUDA_LIBRARIES} <= set(files)
