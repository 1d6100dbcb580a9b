#!/usr/bin/env python3
"""Write the SBOM (CycloneDX 1.5 JSON) of an OCI image archive that build-oci.py wrote.

    sbom.py IMAGE.oci.tar -o IMAGE.cdx.json \\
        --cargo /usr/bin/ferrite-server=ferrite-server \\
        --pypi /usr/lib/ferrite/libonnxruntime.so=onnxruntime==1.31.1 --pip-report .venv/pip-report.json

Every regular file of the image is accounted for, read from the archive itself:

  --cargo PATH=PACKAGE   PATH is the binary of the workspace package PACKAGE: one
                         component for it (SHA-256 of the file in the image) and one
                         per crate linked into it, from `cargo metadata` (its normal
                         dependencies, default features, this platform; proc-macros
                         and build scripts run at build time only and are left out)
                         with the version, the checksum from Cargo.lock and the license.
  --pypi PATH=NAME==VER  PATH comes from the PyPI wheel NAME==VER (ONNX Runtime): the
                         SHA-256 of the file in the image and, from pip's install report
                         (--pip-report, written by `make venv`), the wheel's file name and
                         SHA-256, the hash that --require-hashes checked.
  --wheels PROV=DIR      the libraries images/cuda/stage.py took from pinned wheels
                         (onnxruntime-gpu, NVIDIA's CUDA wheels) into DIR: one component
                         per wheel with its file name and SHA-256 and each file's SHA-256.
  any other file         the Debian package that owns it on this machine (dpkg -S), with
                         the installed version (dpkg-query): build-oci.py copies the
                         shared libraries from the host. The CA bundle is generated from
                         the ca-certificates package. Files that no package owns (the
                         /etc/passwd that build-oci.py writes) are listed as files.

The output is deterministic (timestamp from SOURCE_DATE_EPOCH, serial number derived
from the image's manifest digest, sorted components). Only the Python standard library.
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import tomllib
import urllib.parse
import uuid

# Written by update-ca-certificates from the package's certificates, so dpkg owns
# no file of that name.
GENERATED_BY_PACKAGE = {"etc/ssl/certs/ca-certificates.crt": "ca-certificates"}


def image_files(archive):
    """(manifest digest, {path without leading '/': sha256 hex}) of the image's
    regular files, upper layers over lower ones."""
    with tarfile.open(archive) as tar:
        def blob(digest):
            return tar.extractfile("blobs/sha256/" + digest.split(":")[1]).read()

        index = json.loads(tar.extractfile("index.json").read())
        manifest_digest = index["manifests"][0]["digest"]
        manifest = json.loads(blob(manifest_digest))
        files = {}
        for layer in manifest["layers"]:
            with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob(layer["digest"])))) as layer_tar:
                for member in layer_tar.getmembers():
                    name = member.name.lstrip("./")
                    if member.isfile():
                        files[name] = hashlib.sha256(layer_tar.extractfile(member).read()).hexdigest()
                    else:
                        files.pop(name, None)
    return manifest_digest, files


def cargo_components(package, metadata, lock):
    """Components of the workspace package and of every crate linked into it."""
    checksums = {(p["name"], p["version"]): p.get("checksum") for p in lock.get("package", [])}
    packages = {p["id"]: p for p in metadata["packages"]}
    nodes = {n["id"]: n for n in metadata["resolve"]["nodes"]}
    roots = [i for i in metadata["workspace_members"] if packages[i]["name"] == package]
    if not roots:
        sys.exit(f"sbom: no workspace package {package!r}")
    seen, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        for dep in nodes[pid]["deps"]:
            if not any(k["kind"] is None for k in dep["dep_kinds"]):
                continue  # dev- or build-dependency
            target_kinds = {k for t in packages[dep["pkg"]]["targets"] for k in t["kind"]}
            if "proc-macro" in target_kinds:
                continue  # runs in the compiler, not linked
            todo.append(dep["pkg"])
    components = []
    for pid in seen:
        p = packages[pid]
        component = {
            "type": "library",
            "bom-ref": f"pkg:cargo/{p['name']}@{p['version']}",
            "name": p["name"],
            "version": p["version"],
            "purl": f"pkg:cargo/{p['name']}@{p['version']}",
        }
        checksum = checksums.get((p["name"], p["version"]))
        if checksum:
            component["hashes"] = [{"alg": "SHA-256", "content": checksum}]
        if p.get("license"):
            # Old manifests write "MIT/Apache-2.0": SPDX says "MIT OR Apache-2.0".
            expression = " OR ".join(part.strip() for part in p["license"].split("/"))
            component["licenses"] = [{"expression": expression}]
        if p["source"] is None:
            component["properties"] = [{"name": "ferrite:source", "value": "this repository (workspace crate)"}]
        components.append(component)
    return components


def dpkg_owner(path):
    """The package that owns /path on this machine (trying the merged-/usr spelling
    too), or None."""
    candidates = ["/" + path]
    candidates.append("/" + path[len("usr/"):] if path.startswith("usr/") else "/usr/" + path)
    for candidate in candidates:
        result = subprocess.run(["dpkg", "-S", candidate], capture_output=True, text=True)
        for line in result.stdout.splitlines():
            owners, _, owned = line.rpartition(": ")
            if owned == candidate and "diversion" not in owners:
                return owners.split(",")[0].strip()
    return None


def dpkg_component(package, distro):
    fields = "${Package}\t${Version}\t${Architecture}\t${source:Package}\t${source:Version}"
    out = subprocess.run(["dpkg-query", "-W", "-f", fields, package], check=True, capture_output=True, text=True).stdout
    name, version, arch, source, source_version = out.split("\t")
    purl = f"pkg:deb/debian/{quote(name)}@{quote(version)}?arch={arch}" + (f"&distro={distro}" if distro else "")
    return {
        "type": "library",
        "bom-ref": purl,
        "name": name,
        "version": version,
        "purl": purl,
        "properties": [{"name": "ferrite:deb-source", "value": f"{source} {source_version}"}],
    }


def os_release_distro():
    """`debian-12` from /etc/os-release (the purl's distro qualifier), or None."""
    try:
        values = dict(
            line.rstrip("\n").split("=", 1) for line in open("/etc/os-release") if "=" in line
        )
    except OSError:
        return None
    ident, version = values.get("ID", "").strip('"'), values.get("VERSION_ID", "").strip('"')
    return f"{ident}-{version}" if ident and version else None


def pip_wheel(report_path, name, version):
    """(wheel file name, sha256) of NAME==VERSION in pip's install report, or None."""
    if not report_path or not os.path.exists(report_path):
        return None
    with open(report_path) as f:
        report = json.load(f)
    for item in report.get("install", []):
        meta = item.get("metadata", {})
        if meta.get("name", "").lower() == name.lower() and meta.get("version") == version:
            info = item.get("download_info", {})
            sha = info.get("archive_info", {}).get("hashes", {}).get("sha256")
            return info.get("url", "").rsplit("/", 1)[-1], sha
    return None


def quote(text):
    """A purl name or version: '+' (libstdc++6, 2.36-9+deb12u14) percent-encoded."""
    return urllib.parse.quote(text, safe=".-_~")


def file_property(path, sha):
    return {"name": "ferrite:file", "value": f"/{path} sha256:{sha}"}


def build(args):
    manifest_digest, files = image_files(args.archive)
    components, claimed = [], set()

    if args.cargo:
        metadata = json.loads(
            subprocess.run(
                ["cargo", "metadata", "--format-version", "1", "--locked", "--filter-platform", host_triple()],
                check=True, capture_output=True, text=True, cwd=args.workspace,
            ).stdout
        )
        with open(os.path.join(args.workspace, "Cargo.lock"), "rb") as f:
            lock = tomllib.load(f)
    for spec in args.cargo:
        path, package = spec.split("=", 1)
        path = path.lstrip("/")
        if path not in files:
            sys.exit(f"sbom: /{path} is not in {args.archive}")
        crates = cargo_components(package, metadata, lock)
        for c in crates:
            if c["name"] == package:
                c["type"] = "application"
                c["hashes"] = [{"alg": "SHA-256", "content": files[path]}]
                c.setdefault("properties", []).append(file_property(path, files[path]))
        components.extend(crates)
        claimed.add(path)

    for spec in args.pypi:
        path, requirement = spec.split("=", 1)
        name, _, version = requirement.partition("==")
        path = path.lstrip("/")
        if path not in files:
            sys.exit(f"sbom: /{path} is not in {args.archive}")
        component = {
            "type": "library",
            "bom-ref": f"pkg:pypi/{name}@{version}",
            "name": name,
            "version": version,
            "purl": f"pkg:pypi/{name}@{version}",
            "hashes": [{"alg": "SHA-256", "content": files[path]}],
            "properties": [file_property(path, files[path])],
        }
        wheel = pip_wheel(args.pip_report, name, version)
        if wheel:
            component["properties"] += [
                {"name": "ferrite:wheel", "value": wheel[0]},
                {"name": "ferrite:wheel-sha256", "value": wheel[1]},
            ]
        else:
            component["properties"].append(
                {"name": "ferrite:wheel", "value": "installed with --require-hashes from requirements-lock.txt"}
            )
        components.append(component)
        claimed.add(path)

    for spec in args.wheels:
        provenance, _, image_dir = spec.partition("=")
        with open(provenance) as f:
            for item in json.load(f)["install"]:
                name, version = item["metadata"]["name"], item["metadata"]["version"]
                info = item["download_info"]
                component = {
                    "type": "library",
                    "bom-ref": f"pkg:pypi/{name}@{version}",
                    "name": name,
                    "version": version,
                    "purl": f"pkg:pypi/{name}@{version}",
                    "properties": [
                        {"name": "ferrite:wheel", "value": info["url"].rsplit("/", 1)[-1]},
                        {"name": "ferrite:wheel-sha256", "value": info["archive_info"]["hashes"]["sha256"]},
                    ],
                }
                for target in item["ferrite_files"]:
                    path = posixpath_join(image_dir, target).lstrip("/")
                    if path not in files:
                        sys.exit(f"sbom: /{path} (from {name}) is not in {args.archive}")
                    component["properties"].append(file_property(path, files[path]))
                    claimed.add(path)
                components.append(component)

    distro = os_release_distro()
    debs, unowned = {}, []
    for path in sorted(set(files) - claimed):
        package = GENERATED_BY_PACKAGE.get(path) or dpkg_owner(path)
        if package is None:
            unowned.append(path)
            continue
        package = package.split(":")[0]  # libc6:amd64 -> libc6
        if package not in debs:
            debs[package] = dpkg_component(package, distro)
        debs[package]["properties"].append(file_property(path, files[path]))
    components.extend(debs.values())
    for path in unowned:
        components.append(
            {
                "type": "file",
                "bom-ref": f"file:/{path}",
                "name": "/" + path,
                "hashes": [{"alg": "SHA-256", "content": files[path]}],
            }
        )

    components.sort(key=lambda c: (c["type"], c["bom-ref"]))
    for c in components:
        if "properties" in c:
            c["properties"].sort(key=lambda p: (p["name"], p["value"]))
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))
    import datetime

    timestamp = datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    image_ref = f"image:{manifest_digest}"
    bom = {
        "bomFormat": "CycloneDX",
        "specVersion": "1.5",
        "serialNumber": f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, 'oci-manifest:' + manifest_digest)}",
        "version": 1,
        "metadata": {
            "timestamp": timestamp,
            "tools": {"components": [{"type": "application", "name": "ferrite images/sbom.py"}]},
            "component": {
                "type": "container",
                "bom-ref": image_ref,
                "name": args.name,
                "version": args.version,
                "hashes": [{"alg": "SHA-256", "content": manifest_digest.split(":")[1]}],
            },
        },
        "components": components,
        "dependencies": [{"ref": image_ref, "dependsOn": [c["bom-ref"] for c in components]}],
    }
    tmp = args.output + ".tmp"
    with open(tmp, "w") as f:
        json.dump(bom, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, args.output)
    kinds = {}
    for c in components:
        kind = c["purl"].split("/")[0] if "purl" in c else "file"
        kinds[kind] = kinds.get(kind, 0) + 1
    print(f"==> {args.output}: CycloneDX 1.5, " + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())))


def posixpath_join(directory, name):
    return directory.rstrip("/") + "/" + name


def host_triple():
    out = subprocess.run(["rustc", "-vV"], check=True, capture_output=True, text=True).stdout
    return next(line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("host: "))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("archive", help="the OCI image archive (build-oci.py)")
    p.add_argument("--output", "-o", required=True, help="the SBOM to write (CycloneDX JSON)")
    p.add_argument("--name", required=True, help="the image's name, e.g. ferrite-server")
    p.add_argument("--version", required=True, help="the image's version")
    p.add_argument("--cargo", action="append", default=[], help="PATH=PACKAGE: PATH is that workspace package's binary")
    p.add_argument("--pypi", action="append", default=[], help="PATH=NAME==VERSION: PATH comes from that wheel")
    p.add_argument("--wheels", action="append", default=[],
                   help="PROVENANCE=IMAGE_DIR: the libraries images/cuda/stage.py took from wheels "
                        "(its provenance.json), installed in IMAGE_DIR: one component per wheel")
    p.add_argument("--pip-report", help="pip's install report (pip install --report), for the wheels' hashes")
    p.add_argument("--workspace", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                   help="the Cargo workspace (default: this repository)")
    build(p.parse_args(argv))


if __name__ == "__main__":
    main()
