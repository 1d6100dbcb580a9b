#!/usr/bin/env python3
"""Write a minimal, reproducible OCI image archive without a container daemon.

The image holds only what is named on the command line plus what it needs to run:

  base layer   /etc/passwd, /etc/group (root and nonroot, uid/gid 65532),
               /etc/nsswitch.conf, CA certificates, /tmp (1777), /home/nonroot
  libs layer   the dynamic loader and every shared library that `ldd` resolves
               for the ELF files added with --elf or --lib (the exact host files;
               the symbolic links on the way, such as /lib -> usr/lib, are kept),
               except those found in a --lib-dir (added as items of their own)
  one layer per --elf/--lib/--file, in the order given (rarely changing files first)

There is no shell and no package manager. Every tar entry has mtime 0, uid/gid 0
(except --chown'd paths) and a fixed mode; entries are sorted; gzip has no name or
time: two builds from the same inputs give the same digests.

Output: an OCI image layout as a tar (oci-layout, index.json, blobs/sha256/...),
the image named through the `org.opencontainers.image.ref.name` annotation
(and `io.containerd.image.name`), plus a docker-archive manifest.json so that
`docker load` and `podman load` accept the same file. `ctr images import` reads it.

This is the project's one OCI image writer: `make images` (images/images.mk)
builds ferrite-server, ferrite-server-cuda and ferrite-operator with it, and the local cluster
(e2e/cluster/up.sh) its pause and hello images (static binaries, so --file:
no libraries to resolve).

Only the Python 3 standard library is used. Why not a packaged tool (measured
2026-12-02 on the 2-core dev machine, ferrite-server release image, 4 layers,
21.6 MB compressed): Debian's umoci (bookworm: 0.4.7) installs in 8.5 s (root,
apt) and writes the layers in 1.5-3 s against 8.7-12 s here (gzip level 9), but
(1) its `umoci insert` layers lack the tar end-of-archive blocks (umoci issue
#436, fixed after 0.4.7): GNU tar and Python's tarfile, hence check.py, reject
the libonnxruntime and ferrite-server layers; (2) the digests follow the
staging tree's mtimes (two builds differed until every directory and symbolic
link was reset to time 0), where this writer gives byte-identical archives from
the same inputs by construction; (3) it writes neither the containerd name
annotation nor the docker-archive manifest.json, and the ldd walk and the base
files stay ours, so this file would shrink by only its ~100 lines of tar/JSON.
Rust's oci-spec crate has the JSON types only (no layout or tar writing). The
gain (seconds on a step that runs after a multi-minute cargo build) does not pay
for a root-installed, distribution-versioned dependency.
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import re
import stat
import subprocess
import sys
import tarfile
import tempfile

NONROOT_UID = 65532
NONROOT_GID = 65532

MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

PASSWD = (
    "root:x:0:0:root:/root:/sbin/nologin\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n"
    f"nonroot:x:{NONROOT_UID}:{NONROOT_GID}:nonroot:/home/nonroot:/sbin/nologin\n"
)
GROUP = "root:x:0:\nnobody:x:65534:\n" f"nonroot:x:{NONROOT_GID}:\n"
# glibc resolves names through /etc/hosts before DNS only when told so.
NSSWITCH = "passwd: files\ngroup: files\nhosts: files dns\n"


class Layer:
    """An in-memory file tree that becomes one deterministic tar layer."""

    def __init__(self, name):
        self.name = name
        self.entries = {}  # path (no leading /) -> dict

    def _parents(self, path):
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in self.entries:
                self.entries[d] = {"type": "dir", "mode": 0o755, "uid": 0, "gid": 0}

    def add_dir(self, path, mode=0o755, uid=0, gid=0):
        path = path.strip("/")
        self._parents(path)
        self.entries[path] = {"type": "dir", "mode": mode, "uid": uid, "gid": gid}

    def add_bytes(self, path, data, mode=0o644, uid=0, gid=0):
        path = path.strip("/")
        self._parents(path)
        self.entries[path] = {"type": "file", "data": data, "mode": mode, "uid": uid, "gid": gid}

    def add_file(self, path, src, mode=None):
        with open(src, "rb") as f:
            data = f.read()
        if mode is None:
            mode = 0o755 if os.stat(src).st_mode & 0o111 else 0o644
        self.add_bytes(path, data, mode)

    def add_symlink(self, path, target):
        path = path.strip("/")
        self._parents(path)
        self.entries[path] = {"type": "symlink", "target": target, "mode": 0o777, "uid": 0, "gid": 0}

    def tar_bytes(self):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for path in sorted(self.entries):
                e = self.entries[path]
                ti = tarfile.TarInfo(path)
                ti.mtime = 0
                ti.uid, ti.gid = e["uid"], e["gid"]
                ti.uname = ti.gname = ""
                ti.mode = e["mode"]
                if e["type"] == "dir":
                    ti.type = tarfile.DIRTYPE
                    tar.addfile(ti)
                elif e["type"] == "symlink":
                    ti.type = tarfile.SYMTYPE
                    ti.linkname = e["target"]
                    tar.addfile(ti)
                else:
                    ti.size = len(e["data"])
                    tar.addfile(ti, io.BytesIO(e["data"]))
        return buf.getvalue()


def gzip_bytes(data, level=9):
    buf = io.BytesIO()
    # No file name, mtime 0: the compressed bytes depend on the content alone.
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=level) as gz:
        gz.write(data)
    return buf.getvalue()


def cached_gzip(raw, diff_id, level, cache_dir):
    """gzip_bytes(raw, level), kept in `cache_dir` under the layer's diff_id:
    the same layer compresses to the same bytes, so a rebuild reuses them
    (the CUDA image's libraries take minutes to compress)."""
    if not cache_dir:
        return gzip_bytes(raw, level)
    path = os.path.join(cache_dir, f"{diff_id.split(':')[1]}.{level}.gz")
    if os.path.exists(path):
        with open(path, "rb") as f:
            gz = f.read()
        if gzip.decompress(gz) == raw:
            return gz
    gz = gzip_bytes(raw, level)
    os.makedirs(cache_dir, exist_ok=True)
    with open(path + ".tmp", "wb") as f:
        f.write(gz)
    os.replace(path + ".tmp", path)
    return gz


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


# --- shared libraries -------------------------------------------------------

LDD_ARROW = re.compile(r"^\s*(\S+)\s+=>\s+(\S+)\s+\(0x[0-9a-f]+\)\s*$")
LDD_PLAIN = re.compile(r"^\s*(/\S+)\s+\(0x[0-9a-f]+\)\s*$")


def ldd(path, lib_dirs=(), allow_missing=()):
    """Return the absolute paths of the loader and of every library `path` needs
    that is not in one of `lib_dirs` (searched first: their libraries go into
    the image as --elf/--file items of their own). A library named in
    `allow_missing` may be missing (the NVIDIA driver's libcuda.so.1, which the
    container runtime mounts)."""
    env = dict(os.environ)
    if lib_dirs:
        env["LD_LIBRARY_PATH"] = ":".join(os.path.abspath(d) for d in lib_dirs)
    out = subprocess.run(["ldd", path], check=True, capture_output=True, text=True, env=env).stdout
    mine = tuple(os.path.realpath(d) + "/" for d in lib_dirs)
    paths = []
    for line in out.splitlines():
        if "not found" in line:
            if line.split()[0] in allow_missing:
                continue
            sys.exit(f"build-oci: {path}: a library is missing on this machine: {line.strip()}")
        m = LDD_ARROW.match(line)
        if m and mine and os.path.realpath(m.group(2)).startswith(mine):
            continue
        m = LDD_ARROW.match(line)
        if m:
            paths.append(m.group(2))
            continue
        m = LDD_PLAIN.match(line)
        if m:  # the dynamic loader (linux-vdso has no path and is skipped)
            paths.append(m.group(1))
    return paths


def without_debug_info(path):
    """The bytes of ELF file `path` without its debug sections (objcopy)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "stripped")
        subprocess.run(["objcopy", "--strip-debug", path, out], check=True)
        with open(out, "rb") as f:
            return f.read()


def add_host_path(layer, path):
    """Copy `path` from this machine, keeping every symbolic link along the way."""
    seen = 0
    while True:
        seen += 1
        if seen > 40:
            sys.exit(f"build-oci: too many symbolic links at {path}")
        parts = path.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            prefix = "/" + "/".join(parts[:i])
            if os.path.islink(prefix):
                target = os.readlink(prefix)
                layer.add_symlink(prefix, target)
                base = os.path.dirname(prefix)
                resolved = os.path.normpath(os.path.join(base, target))
                path = resolved + ("/" + "/".join(parts[i:]) if i < len(parts) else "")
                break
        else:
            st = os.stat(path)
            if not stat.S_ISREG(st.st_mode):
                sys.exit(f"build-oci: {path} is not a regular file")
            layer.add_file(path, path, mode=0o755 if st.st_mode & 0o111 else 0o644)
            return


# --- the image ----------------------------------------------------------------


def base_layer(ca_file):
    layer = Layer("base")
    layer.add_bytes("etc/passwd", PASSWD.encode())
    layer.add_bytes("etc/group", GROUP.encode())
    layer.add_bytes("etc/nsswitch.conf", NSSWITCH.encode())
    with open(ca_file, "rb") as f:
        layer.add_bytes("etc/ssl/certs/ca-certificates.crt", f.read())
    layer.add_dir("tmp", mode=0o1777)
    layer.add_dir("home/nonroot", mode=0o700, uid=NONROOT_UID, gid=NONROOT_GID)
    layer.add_dir("root", mode=0o700)
    return layer


def parse_pair(text, what):
    if ":" not in text:
        sys.exit(f"build-oci: {what} wants SRC:DEST, got {text!r}")
    src, dest = text.split(":", 1)
    if not dest.startswith("/"):
        sys.exit(f"build-oci: {what} destination must be absolute: {dest!r}")
    return src, dest


def build(args):
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))
    import datetime

    created = datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")

    layers = [base_layer(args.ca_certificates)]

    libs = Layer("libs")
    app_layers = []
    for kind, spec in args.items:
        src, dest = parse_pair(spec, "--" + kind)
        if not os.path.isfile(src):
            sys.exit(f"build-oci: {src}: no such file")
        layer = Layer(f"{kind} {dest}")
        if kind == "lib":  # someone else's library: its bytes as shipped (the SBOM hashes them)
            kind = "elf"
            layer.add_file(dest, src)
        elif kind == "elf" and args.strip_debug:
            layer.add_bytes(dest, without_debug_info(src), mode=os.stat(src).st_mode & 0o777)
        else:
            layer.add_file(dest, src)
        app_layers.append(layer)
        if kind == "elf":
            for lib in ldd(src, args.lib_dir, args.allow_missing):
                add_host_path(libs, lib)
    if libs.entries:
        layers.append(libs)
    layers.extend(app_layers)

    blobs = {}
    diff_ids, layer_descs, history = [], [], []
    for layer in layers:
        raw = layer.tar_bytes()
        layer.entries = {}  # the bytes live on in `raw` only: GBs for the CUDA image
        diff_id = sha256(raw)
        gz = cached_gzip(raw, diff_id, args.gzip_level, args.layer_cache)
        diff_ids.append(diff_id)
        d = sha256(gz)
        blobs[d] = gz
        layer_descs.append({"mediaType": MT_LAYER, "digest": d, "size": len(gz)})
        history.append({"created": created, "created_by": f"images/build-oci.py: {layer.name}"})

    env = {"PATH": DEFAULT_PATH}
    for kv in args.env:
        k, _, v = kv.partition("=")
        env[k] = v
    labels = dict(kv.partition("=")[::2] for kv in args.label)
    cfg = {
        "User": args.user,
        "Env": [f"{k}={v}" for k, v in env.items()],
        "Entrypoint": args.entrypoint,
        "WorkingDir": args.workdir,
        "Labels": labels,
    }
    if args.cmd:
        cfg["Cmd"] = args.cmd
    if args.expose:
        cfg["ExposedPorts"] = {(p if "/" in p else p + "/tcp"): {} for p in args.expose}
    config = {
        "created": created,
        "architecture": args.arch,
        "os": "linux",
        "config": cfg,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": history,
    }
    config_bytes = canonical_json(config)
    config_digest = sha256(config_bytes)
    blobs[config_digest] = config_bytes

    manifest = {
        "schemaVersion": 2,
        "mediaType": MT_MANIFEST,
        "config": {"mediaType": MT_CONFIG, "digest": config_digest, "size": len(config_bytes)},
        "layers": layer_descs,
        "annotations": {k: v for k, v in labels.items() if k.startswith("org.opencontainers.image.")},
    }
    manifest_bytes = canonical_json(manifest)
    manifest_digest = sha256(manifest_bytes)
    blobs[manifest_digest] = manifest_bytes

    ref = args.ref  # a full reference: docker.io/library/ferrite-server:0.1.0
    index = {
        "schemaVersion": 2,
        "mediaType": MT_INDEX,
        "manifests": [
            {
                "mediaType": MT_MANIFEST,
                "digest": manifest_digest,
                "size": len(manifest_bytes),
                "platform": {"architecture": args.arch, "os": "linux"},
                "annotations": {
                    "io.containerd.image.name": ref,
                    "org.opencontainers.image.ref.name": ref,
                },
            }
        ],
    }
    files = {
        "oci-layout": canonical_json({"imageLayoutVersion": "1.0.0"}),
        "index.json": canonical_json(index),
    }
    if args.docker_manifest:
        files["manifest.json"] = canonical_json(
            [
                {
                    "Config": "blobs/sha256/" + config_digest.split(":")[1],
                    "RepoTags": [ref],
                    "Layers": ["blobs/sha256/" + l["digest"].split(":")[1] for l in layer_descs],
                }
            ]
        )
    for digest, data in blobs.items():
        files["blobs/sha256/" + digest.split(":")[1]] = data

    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    tmp = args.output + ".tmp"
    with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs = {"blobs", "blobs/sha256"}
        for name in sorted(set(files) | dirs):
            ti = tarfile.TarInfo(name)
            ti.mtime = 0
            ti.uname = ti.gname = ""
            if name in dirs:
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(ti)
            else:
                ti.mode, ti.size = 0o644, len(files[name])
                tar.addfile(ti, io.BytesIO(files[name]))
    os.replace(tmp, args.output)

    size = sum(l["size"] for l in layer_descs)
    print(
        f"==> {args.output}: {ref} manifest {manifest_digest} "
        f"({len(layer_descs)} layers, {size / 1e6:.1f} MB compressed)"
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ref", required=True, help="full image reference, e.g. docker.io/library/ferrite-server:0.1.0")
    p.add_argument("--output", "-o", required=True, help="the OCI archive to write")
    p.add_argument(
        "--elf", dest="items", action="append", type=lambda s: ("elf", s), default=[],
        help="SRC:DEST an executable or shared library; its libraries (ldd) go into the libs layer",
    )
    p.add_argument(
        "--lib", dest="items", action="append", type=lambda s: ("lib", s),
        help="SRC:DEST a shared library taken as it is (never stripped), its libraries resolved like --elf's",
    )
    p.add_argument(
        "--file", dest="items", action="append", type=lambda s: ("file", s),
        help="SRC:DEST any other file",
    )
    p.add_argument("--lib-dir", action="append", default=[],
                   help="directory searched first for the --elf files' libraries (LD_LIBRARY_PATH for ldd); its "
                        "libraries are not copied into the libs layer: add them as --elf/--file items")
    p.add_argument("--allow-missing", action="append", default=[], metavar="SONAME",
                   help="a library that may be missing here and in the image (libcuda.so.1: the NVIDIA "
                        "container runtime mounts the driver's)")
    p.add_argument("--gzip-level", type=int, default=9, choices=range(1, 10),
                   help="gzip level of the layers (default 9; the CUDA image's GBs take 6)")
    p.add_argument("--layer-cache", metavar="DIR",
                   help="keep compressed layers here by diff_id and reuse them (same bytes, no recompression)")
    p.add_argument("--strip-debug", action="store_true",
                   help="drop debug sections from the --elf files (objcopy), for images of debug builds")
    p.add_argument("--entrypoint", action="append", required=True, help="repeat for each word")
    p.add_argument("--cmd", action="append", default=[], help="repeat for each word")
    p.add_argument("--env", action="append", default=[], help="KEY=VALUE")
    p.add_argument("--label", action="append", default=[], help="KEY=VALUE")
    p.add_argument("--expose", action="append", default=[], help="PORT[/PROTO]")
    p.add_argument("--user", default=f"{NONROOT_UID}:{NONROOT_GID}")
    p.add_argument("--workdir", default="/")
    p.add_argument("--arch", default={"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine))
    p.add_argument("--ca-certificates", default="/etc/ssl/certs/ca-certificates.crt")
    p.add_argument("--no-docker-manifest", dest="docker_manifest", action="store_false",
                   help="leave out the docker-archive manifest.json")
    build(p.parse_args(argv))


if __name__ == "__main__":
    main()
