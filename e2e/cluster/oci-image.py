#!/usr/bin/env python3
"""Write a one-layer OCI image archive around static binaries (no daemon).

    oci-image.py --ref ferrite.local/pause:3.10 --out pause.oci.tar \
        --add build/pause:/pause --entrypoint /pause [--user 65535] [--port 8080]

The archive is an OCI image layout as a tar: oci-layout, index.json (the image
named by the `io.containerd.image.name` and `org.opencontainers.image.ref.name`
annotations) and blobs/sha256/{layer, config, manifest}; `ctr -n k8s.io images
import` reads it. The layer holds only the files given (with their parent
directories), every entry with mtime 0 and uid/gid 0: the same inputs give the
same digests. Only for static binaries: nothing resolves shared libraries here
(images/build-oci.py does that for the product's images). Python stdlib only.
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import tarfile

MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def layer_tar(files):
    buf = io.BytesIO()
    dirs = set()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for src, dest in sorted(files, key=lambda f: f[1]):
            parts = dest.strip("/").split("/")
            for i in range(1, len(parts)):
                d = "/".join(parts[:i])
                if d not in dirs:
                    dirs.add(d)
                    ti = tarfile.TarInfo(d)
                    ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, 0
                    tar.addfile(ti)
            data = open(src, "rb").read()
            ti = tarfile.TarInfo("/".join(parts))
            ti.size, ti.mode, ti.mtime = len(data), 0o755, 0
            tar.addfile(ti, io.BytesIO(data))
        # an empty /tmp, for programs that want one
        ti = tarfile.TarInfo("tmp")
        ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o1777, 0
        tar.addfile(ti)
    return buf.getvalue()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref", required=True, help="image name, e.g. ferrite.local/pause:3.10")
    ap.add_argument("--out", required=True, help="archive to write")
    ap.add_argument("--add", action="append", default=[], metavar="SRC:DEST", help="file to put at DEST (mode 0755)")
    ap.add_argument("--entrypoint", action="append", default=[], help="entrypoint argv element (repeat)")
    ap.add_argument("--cmd", action="append", default=[], help="cmd argv element (repeat)")
    ap.add_argument("--user", default="", help="user[:group], numeric")
    ap.add_argument("--port", action="append", default=[], help="exposed TCP port (repeat)")
    a = ap.parse_args()

    files = []
    for spec in a.add:
        src, _, dest = spec.partition(":")
        if not dest.startswith("/"):
            ap.error(f"--add {spec}: DEST must be absolute")
        files.append((src, dest))

    raw = layer_tar(files)
    # gzip with no file name and mtime 0: reproducible
    gz = io.BytesIO()
    with gzip.GzipFile(fileobj=gz, mode="wb", mtime=0, filename="") as g:
        g.write(raw)
    layer = gz.getvalue()
    blobs = {}

    def blob(data):
        d = hashlib.sha256(data).hexdigest()
        blobs[d] = data
        return "sha256:" + d

    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"],
            "Entrypoint": a.entrypoint or None,
            "Cmd": a.cmd or None,
            "User": a.user,
            "WorkingDir": "/",
            "ExposedPorts": {f"{p}/tcp": {} for p in a.port} or None,
        },
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(raw).hexdigest()]},
        "history": [{"created_by": "e2e/cluster/oci-image.py", "created": "1970-01-01T00:00:00Z"}],
        "created": "1970-01-01T00:00:00Z",
    }
    config["config"] = {k: v for k, v in config["config"].items() if v not in (None, "")}
    cfg = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": MT_MANIFEST,
        "config": {"mediaType": MT_CONFIG, "digest": blob(cfg), "size": len(cfg)},
        "layers": [{"mediaType": MT_LAYER, "digest": blob(layer), "size": len(layer)}],
    }
    man = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    index = {
        "schemaVersion": 2,
        "mediaType": MT_INDEX,
        "manifests": [{
            "mediaType": MT_MANIFEST,
            "digest": blob(man),
            "size": len(man),
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {
                "io.containerd.image.name": a.ref,
                "org.opencontainers.image.ref.name": a.ref,
            },
        }],
    }

    tmp = a.out + ".tmp"
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as out:
        def put(name, data):
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), 0o644, 0
            out.addfile(ti, io.BytesIO(data))
        put("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        put("index.json", json.dumps(index, sort_keys=True).encode())
        for d in sorted(blobs):
            put(f"blobs/sha256/{d}", blobs[d])
    os.replace(tmp, a.out)


if __name__ == "__main__":
    main()
