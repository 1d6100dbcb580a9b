"""Tests of the image writer and its checker (no container runtime needed).

    .venv/bin/python -m pytest -q images/test_images.py

A small image around a host executable (/usr/bin/true) is built twice and
checked; broken images must be refused. When `make images` has written the real
archives, they are checked too (skipped otherwise).
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
