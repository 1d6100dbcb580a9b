#!/usr/bin/env python3
"""Check OCI image archives written by images/build-oci.py, without a container runtime.

For each archive:
  - layout: oci-layout, index.json -> manifest -> config -> layers; every blob's
    name is the sha256 of its bytes and every descriptor's size is right; media
    types; layer diff_ids are the sha256 of the uncompressed tars; the image is
    named (org.opencontainers.image.ref.name); manifest.json (docker-archive) agrees
  - config: User 65532:65532, the entrypoint is an executable file in the image,
    ORT_DYLIB_PATH (when set) names a file in the image, OCI labels present
  - root filesystem: no shell (/bin/sh or any sh/bash/dash/busybox), /etc/passwd
    and /etc/group have the nonroot user, CA certificates, /tmp is 1777, nothing
    owned by anyone but root except the nonroot home, nothing world-writable but /tmp
  - libraries: every ELF file's interpreter (PT_INTERP) and DT_NEEDED libraries,
    recursively, resolve inside the image as the loader would (no ld.so.cache:
    RUNPATH, the image's LD_LIBRARY_PATH, then the default directories; only
    --allow-missing names may be absent: libcuda.so.1, which the NVIDIA
    container runtime mounts); with --ldd IMAGE_PATH=HOST_PATH the file equals
    the host file and every library `ldd` lists for it is in the image; with
    --ldd-in-image IMAGE_PATH the image's own loader lists IMAGE_PATH's
    libraries inside the extracted root filesystem, and each must be a file
    of the image
  - --same-as OTHER: the two archives hold the same digests (reproducible build)

Exit status 0 when every check passes; the failures are listed otherwise.
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import posixpath
import re
import struct
import subprocess
import sys
import tarfile

MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYERS = {"application/vnd.oci.image.layer.v1.tar+gzip", "application/vnd.oci.image.layer.v1.tar"}
NONROOT = 65532
SHELLS = {"sh", "bash", "dash", "ash", "zsh", "busybox", "ksh"}
LIB_DIRS = ["/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64", "/lib", "/usr/lib"]


class Failures(list):
    def check(self, ok, msg):
        if not ok:
            self.append(msg)
        return ok


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


# --- the archive --------------------------------------------------------------


def read_archive(path):
    files = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            if m.isfile():
                files[m.name.lstrip("./")] = tar.extractfile(m).read()
    return files


def blob(files, digest, fails, what):
    algo, _, hexd = digest.partition(":")
    data = files.get(f"blobs/{algo}/{hexd}")
    if not fails.check(data is not None, f"{what}: blob {digest} missing"):
        return None
    fails.check(sha256(data) == digest, f"{what}: blob {digest} has digest {sha256(data)}")
    return data


def descriptor(files, desc, fails, what, media_types):
    fails.check(desc.get("mediaType") in media_types, f"{what}: media type {desc.get('mediaType')}")
    data = blob(files, desc["digest"], fails, what)
    if data is not None:
        fails.check(len(data) == desc.get("size"), f"{what}: size {desc.get('size')} but blob has {len(data)}")
    return data


# --- the root filesystem ------------------------------------------------------


class RootFS:
    """The layers applied in order: path -> (TarInfo, bytes or None)."""

    def __init__(self):
        self.entries = {}

    def apply(self, tar_bytes):
        with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
            for m in tar.getmembers():
                name = "/" + m.name.lstrip("./").rstrip("/")
                base = posixpath.basename(name)
                if base.startswith(".wh."):
                    raise ValueError("whiteouts are not expected in these images")
                data = tar.extractfile(m).read() if m.isfile() else None
                self.entries[name] = (m, data)

    def resolve(self, path, depth=0):
        """Follow symbolic links inside the image; return the final path or None."""
        if depth > 40:
            return None
        parts = [p for p in path.split("/") if p]
        cur = "/"
        for i, part in enumerate(parts):
            nxt = posixpath.join(cur, part)
            if part == "..":
                nxt = posixpath.dirname(cur.rstrip("/")) or "/"
            entry = self.entries.get(nxt)
            if entry is None:
                return None
            m, _ = entry
            if m.issym():
                target = m.linkname if m.linkname.startswith("/") else posixpath.join(cur, m.linkname)
                rest = "/".join(parts[i + 1:])
                return self.resolve(posixpath.normpath(target + ("/" + rest if rest else "")), depth + 1)
            cur = nxt
        return cur

    def file(self, path):
        real = self.resolve(path)
        if real is None:
            return None, None
        m, data = self.entries[real]
        return (real, data) if m.isfile() else (real, None)


# --- ELF ----------------------------------------------------------------------


def elf_deps(data):
    """(interpreter or None, [DT_NEEDED], [RUNPATH/RPATH dirs]) of a 64-bit little-endian ELF."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF file")
    e_phoff, = struct.unpack_from("<Q", data, 0x20)
    e_phentsize, e_phnum = struct.unpack_from("<HH", data, 0x36)
    interp, dynamic, loads = None, None, []
    for i in range(e_phnum):
        off = e_phoff + i * e_phentsize
        p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz = struct.unpack_from("<IIQQQQ", data, off)
        if p_type == 3:  # PT_INTERP
            interp = data[p_offset:p_offset + p_filesz].rstrip(b"\0").decode()
        elif p_type == 2:  # PT_DYNAMIC
            dynamic = (p_offset, p_filesz)
        elif p_type == 1:  # PT_LOAD
            loads.append((p_vaddr, p_offset, p_filesz))
    if dynamic is None:
        return interp, [], []
    tags = []
    for j in range(dynamic[1] // 16):
        tag, val = struct.unpack_from("<qQ", data, dynamic[0] + j * 16)
        if tag == 0:
            break
        tags.append((tag, val))
    strtab_vaddr = next((v for t, v in tags if t == 5), None)  # DT_STRTAB
    strtab = None
    for vaddr, off, size in loads:
        if strtab_vaddr is not None and vaddr <= strtab_vaddr < vaddr + size:
            strtab = off + (strtab_vaddr - vaddr)

    def string(off):
        end = data.index(b"\0", strtab + off)
        return data[strtab + off:end].decode()

    needed = [string(v) for t, v in tags if t == 1]  # DT_NEEDED
    paths = [d for t, v in tags if t in (15, 29) for d in string(v).split(":") if d]  # RPATH, RUNPATH
    return interp, needed, paths


def check_libraries(fs, fails, name, env_dirs=(), allow_missing=()):
    """Every ELF file's interpreter and DT_NEEDED libraries, recursively, found
    in the image: RUNPATH, the image's LD_LIBRARY_PATH (`env_dirs`), then the
    default directories. `allow_missing` names libraries the container runtime
    mounts (the NVIDIA driver's libcuda.so.1)."""
    elfs = {p: d for p, (m, d) in fs.entries.items() if m.isfile() and d[:4] == b"\x7fELF"}
    todo = list(elfs)
    seen = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        try:
            interp, needed, runpath = elf_deps(fs.entries[path][1])
        except ValueError as e:
            fails.append(f"{name}: {path}: {e}")
            continue
        if interp:
            real, data = fs.file(interp)
            fails.check(data is not None, f"{name}: {path}: interpreter {interp} not in the image")
        for lib in needed:
            if lib in allow_missing:
                continue
            dirs = [d.replace("$ORIGIN", posixpath.dirname(path)) for d in runpath] + list(env_dirs) + LIB_DIRS
            found = None
            for d in dirs:
                real, data = fs.file(posixpath.join(d, lib))
                if data is not None:
                    found = real
                    break
            if fails.check(found is not None, f"{name}: {path}: needs {lib}, not in the image"):
                todo.append(found)
    return sorted(elfs)


LDD_LINE = re.compile(r"^\s*(?:(\S+)\s+=>\s+)?(/\S+)\s+\(0x[0-9a-f]+\)\s*$")


def check_ldd(fs, fails, name, image_path, host_path):
    real, data = fs.file(image_path)
    if not fails.check(data is not None, f"{name}: {image_path} not in the image"):
        return
    with open(host_path, "rb") as f:
        fails.check(f.read() == data, f"{name}: {image_path} differs from {host_path}")
    out = subprocess.run(["ldd", host_path], check=True, capture_output=True, text=True).stdout
    for line in out.splitlines():
        m = LDD_LINE.match(line)
        if not m:
            continue
        soname, host_lib = m.group(1), m.group(2)
        if soname is None:  # the loader, by its absolute path
            fails.check(fs.file(host_lib)[1] is not None, f"{name}: loader {host_lib} not in the image")
            continue
        ok = any(fs.file(posixpath.join(d, soname))[1] is not None for d in LIB_DIRS)
        if fails.check(ok, f"{name}: {image_path} needs {soname} (ldd), not in the image"):
            with open(os.path.realpath(host_lib), "rb") as f:
                img = next(fs.file(posixpath.join(d, soname))[1] for d in LIB_DIRS
                           if fs.file(posixpath.join(d, soname))[1] is not None)
                fails.check(f.read() == img, f"{name}: {soname} differs from the host's {host_lib}")


# --- the whole check ------------------------------------------------------------


def extract_root(fs, root):
    """Writes the image's root filesystem under `root` (absolute symbolic links
    kept inside it)."""
    for path in sorted(fs.entries):
        m, data = fs.entries[path]
        dest = root + path
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        if m.isdir():
            os.makedirs(dest, exist_ok=True)
        elif m.issym():
            target = root + m.linkname if m.linkname.startswith("/") else m.linkname
            os.symlink(target, dest)
        elif m.isfile():
            with open(dest, "wb") as f:
                f.write(data)
            os.chmod(dest, m.mode & 0o755)


def ldd_in_image(fs, fails, name, image_paths, env_dirs=(), allow_missing=()):
    """Runs the image's own dynamic loader (in ldd's listing mode) on
    each of `image_paths` inside the image's extracted root filesystem, with
    the image's library path: every library must resolve to a file of the
    image ('not found' only for `allow_missing`). Returns {path: ldd lines}."""
    import tempfile

    listed = {}
    with tempfile.TemporaryDirectory(prefix="ferrite-image-root-") as root:
        extract_root(fs, root)
        for image_path in image_paths:
            real, data = fs.file(image_path)
            if not fails.check(data is not None, f"{name}: {image_path} not in the image"):
                continue
            interp, _, _ = elf_deps(data)
            loader = interp or "/lib64/ld-linux-x86-64.so.2"
            if not fails.check(fs.file(loader)[1] is not None, f"{name}: loader {loader} not in the image"):
                continue
            search = ":".join(root + d for d in list(env_dirs) + LIB_DIRS)
            # What ldd does: the loader lists instead of running. (`--list`
            # stops at the first missing library; this lists them all.)
            out = subprocess.run([root + loader, "--library-path", search, root + real],
                                 capture_output=True, text=True, env={"LD_TRACE_LOADED_OBJECTS": "1"})
            lines = [line.strip() for line in out.stdout.splitlines() if line.strip()]
            listed[image_path] = lines
            for line in lines:
                if "not found" in line:
                    fails.check(line.split()[0] in allow_missing, f"{name}: {image_path}: {line} (ldd in the image)")
                    continue
                m = LDD_LINE.match(line)
                if m and m.group(1) is not None:
                    fails.check(os.path.realpath(m.group(2)).startswith(os.path.realpath(root) + "/"),
                                f"{name}: {image_path}: {m.group(1)} resolved outside the image: {m.group(2)}")
            fails.check(out.returncode == 0 or any("not found" in line for line in lines),
                        f"{name}: {image_path}: the loader failed ({out.returncode}): {out.stderr.strip()[-300:]}")
    return listed


def check_archive(path, ldd_pairs=(), verbose=True, allow_missing=(), ldd_in_root=()):
    fails = Failures()
    name = os.path.basename(path)
    files = read_archive(path)
    summary = {"archive": path, "archive_bytes": os.path.getsize(path)}

    layout = json.loads(files.get("oci-layout", b"{}"))
    fails.check(layout.get("imageLayoutVersion") == "1.0.0", f"{name}: oci-layout missing or wrong")
    index = json.loads(files["index.json"])
    fails.check(index.get("schemaVersion") == 2, f"{name}: index schemaVersion")
    fails.check(index.get("mediaType") == MT_INDEX, f"{name}: index mediaType")
    if not fails.check(len(index.get("manifests", [])) == 1, f"{name}: one manifest expected"):
        return fails, summary
    mdesc = index["manifests"][0]
    ref = mdesc.get("annotations", {}).get("org.opencontainers.image.ref.name")
    fails.check(bool(ref), f"{name}: no org.opencontainers.image.ref.name")
    summary["ref"] = ref
    summary["manifest"] = mdesc["digest"]
    manifest = json.loads(descriptor(files, mdesc, fails, f"{name} manifest", {MT_MANIFEST}))
    fails.check(manifest.get("schemaVersion") == 2, f"{name}: manifest schemaVersion")
    config_bytes = descriptor(files, manifest["config"], fails, f"{name} config", {MT_CONFIG})
    config = json.loads(config_bytes)
    diff_ids = config.get("rootfs", {}).get("diff_ids", [])
    fails.check(len(diff_ids) == len(manifest["layers"]), f"{name}: diff_ids and layers differ in number")
    fs = RootFS()
    summary["layers"] = []
    for i, ldesc in enumerate(manifest["layers"]):
        gz = descriptor(files, ldesc, fails, f"{name} layer {i}", MT_LAYERS)
        raw = gzip.decompress(gz) if ldesc["mediaType"].endswith("+gzip") else gz
        if i < len(diff_ids):
            fails.check(sha256(raw) == diff_ids[i], f"{name}: layer {i} diff_id mismatch")
        fs.apply(raw)
        hist = config.get("history", [{}] * (i + 1))
        summary["layers"].append({
            "digest": ldesc["digest"], "size": ldesc["size"], "uncompressed": len(raw),
            "created_by": hist[i].get("created_by") if i < len(hist) else None,
        })
    referenced = {"blobs/sha256/" + d.split(":")[1] for d in
                  [mdesc["digest"], manifest["config"]["digest"]] + [l["digest"] for l in manifest["layers"]]}
    stray = {f for f in files if f.startswith("blobs/")} - referenced
    fails.check(not stray, f"{name}: blobs nobody refers to: {sorted(stray)}")

    if "manifest.json" in files:
        dm = json.loads(files["manifest.json"])
        fails.check(len(dm) == 1, f"{name}: manifest.json has {len(dm)} entries")
        fails.check(dm[0]["Config"] == "blobs/sha256/" + manifest["config"]["digest"].split(":")[1],
                    f"{name}: manifest.json Config differs")
        fails.check(dm[0]["Layers"] == ["blobs/sha256/" + l["digest"].split(":")[1] for l in manifest["layers"]],
                    f"{name}: manifest.json Layers differ")
        fails.check(dm[0].get("RepoTags") == [ref], f"{name}: manifest.json RepoTags {dm[0].get('RepoTags')}")

    # config
    cfg = config.get("config", {})
    fails.check(config.get("os") == "linux" and config.get("architecture"), f"{name}: os/architecture")
    fails.check(cfg.get("User") == f"{NONROOT}:{NONROOT}", f"{name}: User is {cfg.get('User')!r}")
    ep = cfg.get("Entrypoint") or []
    if fails.check(len(ep) >= 1, f"{name}: no Entrypoint"):
        real, data = fs.file(ep[0])
        if fails.check(data is not None, f"{name}: entrypoint {ep[0]} not in the image"):
            fails.check(fs.entries[real][0].mode & 0o111, f"{name}: entrypoint {ep[0]} not executable")
    env = dict(e.split("=", 1) for e in cfg.get("Env", []))
    if "ORT_DYLIB_PATH" in env:
        fails.check(fs.file(env["ORT_DYLIB_PATH"])[1] is not None,
                    f"{name}: ORT_DYLIB_PATH={env['ORT_DYLIB_PATH']} not in the image")
    labels = cfg.get("Labels") or {}
    for key in ("org.opencontainers.image.version", "org.opencontainers.image.revision"):
        fails.check(labels.get(key), f"{name}: label {key} missing")
    summary.update(entrypoint=ep, user=cfg.get("User"), env=cfg.get("Env"),
                   exposed=sorted(cfg.get("ExposedPorts", {})), labels=labels)

    # root filesystem
    fails.check(fs.resolve("/bin/sh") is None, f"{name}: /bin/sh exists")
    shells = [p for p in fs.entries if posixpath.basename(p) in SHELLS]
    fails.check(not shells, f"{name}: shells in the image: {shells}")
    passwd = (fs.file("/etc/passwd")[1] or b"").decode()
    group = (fs.file("/etc/group")[1] or b"").decode()
    fails.check(re.search(rf"^nonroot:x:{NONROOT}:{NONROOT}:", passwd, re.M), f"{name}: /etc/passwd lacks nonroot")
    fails.check(re.search(rf"^nonroot:x:{NONROOT}:", group, re.M), f"{name}: /etc/group lacks nonroot")
    ca = fs.file("/etc/ssl/certs/ca-certificates.crt")[1] or b""
    fails.check(ca.count(b"BEGIN CERTIFICATE") > 10, f"{name}: CA certificates missing")
    tmp = fs.entries.get("/tmp")
    fails.check(tmp is not None and tmp[0].isdir() and tmp[0].mode & 0o7777 == 0o1777, f"{name}: /tmp is not 1777")
    for p, (m, _) in fs.entries.items():
        if m.uid or m.gid:
            fails.check(p == "/home/nonroot" and (m.uid, m.gid) == (NONROOT, NONROOT), f"{name}: {p} owned by {m.uid}:{m.gid}")
        if m.mode & 0o002 and not m.issym():
            fails.check(p == "/tmp", f"{name}: {p} is world-writable")

    env_dirs = [d for d in env.get("LD_LIBRARY_PATH", "").split(":") if d]
    summary["elf_files"] = check_libraries(fs, fails, name, env_dirs, allow_missing)
    if ldd_in_root:
        summary["ldd"] = ldd_in_image(fs, fails, name, ldd_in_root, env_dirs, allow_missing)
    for image_path, host_path in ldd_pairs:
        check_ldd(fs, fails, name, image_path, host_path)
    summary["paths"] = sorted(p for p, (m, _) in fs.entries.items() if not m.isdir())
    return fails, summary


def digests(path):
    files = read_archive(path)
    index = json.loads(files["index.json"])
    return sorted(f for f in files if f.startswith("blobs/")), index["manifests"][0]["digest"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("archives", nargs="+")
    p.add_argument("--ldd", action="append", default=[],
                   help="ARCHIVE_NAME:IMAGE_PATH=HOST_PATH: compare with the host file and its ldd")
    p.add_argument("--same-as", action="append", default=[],
                   help="A=B: archive A must hold exactly the blobs of archive B")
    p.add_argument("--allow-missing", action="append", default=[], metavar="SONAME",
                   help="a library the container runtime mounts (libcuda.so.1), not in the image")
    p.add_argument("--ldd-in-image", action="append", default=[], metavar="ARCHIVE_NAME:IMAGE_PATH",
                   help="run the image's loader on IMAGE_PATH inside the extracted image: all must resolve there")
    p.add_argument("--json", action="store_true", help="print the summaries as JSON")
    args = p.parse_args(argv)

    all_fails = []
    summaries = []
    for path in args.archives:
        pairs = []
        for spec in args.ldd:
            arch, _, pair = spec.partition(":")
            if arch == os.path.basename(path):
                image_path, _, host_path = pair.partition("=")
                pairs.append((image_path, host_path))
        in_root = [spec.partition(":")[2] for spec in args.ldd_in_image if spec.partition(":")[0] == os.path.basename(path)]
        fails, summary = check_archive(path, pairs, allow_missing=args.allow_missing, ldd_in_root=in_root)
        summaries.append(summary)
        all_fails += fails
        if not args.json:
            print(f"{path}: {summary.get('ref')} {summary.get('manifest')}")
            print(f"  archive {summary['archive_bytes'] / 1e6:.1f} MB, user {summary.get('user')}, "
                  f"entrypoint {summary.get('entrypoint')}, ports {summary.get('exposed')}")
            for l in summary.get("layers", []):
                print(f"  layer {l['digest'][:19]} {l['size'] / 1e6:7.2f} MB gz {l['uncompressed'] / 1e6:7.2f} MB  {l['created_by']}")
            print(f"  ELF files: {', '.join(summary.get('elf_files', []))}")
            for image_path, lines in summary.get("ldd", {}).items():
                print(f"  ldd {image_path} (in the image):")
                for line in lines:
                    print(f"    {line}")
            print("  " + ("ok" if not fails else f"{len(fails)} failure(s)"))
    for spec in args.same_as:
        a, _, b = spec.partition("=")
        da, db = digests(a), digests(b)
        if da != db:
            all_fails.append(f"not reproducible: {a} ({da[1]}) and {b} ({db[1]}) differ")
        elif not args.json:
            print(f"reproducible: {a} and {b} both {da[1]}")
    if args.json:
        print(json.dumps(summaries, indent=2))
    for f in all_fails:
        print("FAIL", f, file=sys.stderr)
    return 1 if all_fails else 0


if __name__ == "__main__":
    sys.exit(main())
