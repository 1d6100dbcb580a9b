"""Fixtures of the end-to-end tests (`make e2e`).

- `cluster`: the local single-node cluster (e2e/cluster/up.sh), started here
  when none runs and stopped at the end if started here (E2E_KEEP_CLUSTER=1
  keeps it). Where no cluster can run (not root, no up.sh success), every
  test is skipped loudly, or fails under CI=true.
- `operator`: the ferrite images imported into the cluster's containerd and
  the Helm chart installed (release ferrite-e2e in ferrite-e2e-system),
  uninstalled at the end.
- `model_server`: the test models served over HTTP on the bridge address.
- `namespace`: a fresh namespace per test, deleted afterwards.

Measured times and failed-request counts are printed at the end and written
to .cache/e2e/results.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

import ferrite_e2e as e2e
from ferrite_e2e import ROOT, helm, kubectl, log

CLUSTER_OUT = ROOT / ".cache/k8s/cluster"
KUBECONFIG = CLUSTER_OUT / "kubeconfig"
RELEASE, RELEASE_NS = "ferrite-e2e", "ferrite-e2e-system"
# E2E_IMAGES_DIR: image archives from elsewhere than `make images`' default
# (a branch's images, built with `make images IMAGES_OUT=DIR`).
IMAGES_DIR = Path(os.environ.get("E2E_IMAGES_DIR") or ROOT / ".cache/images")
IMAGES = [IMAGES_DIR / "ferrite-server.oci.tar", IMAGES_DIR / "ferrite-operator.oci.tar"]

RESULTS: dict[str, object] = {}


def record(key: str, value) -> None:
    RESULTS[key] = value
    log(f"MEASURED {key} = {value}")


def cannot_run(message: str):
    if e2e.env_flag("CI"):
        pytest.fail(f"CI=true: the end-to-end tests cannot run: {message}", pytrace=False)
    print(f"\n!!!!!!!! SKIPPED, NOT PASSED: {message} !!!!!!!!\n", flush=True)
    pytest.skip(f"SKIPPED, NOT PASSED: {message}")


def cluster_running() -> bool:
    if not KUBECONFIG.exists():
        return False
    r = subprocess.run([e2e.KUBECTL, "--kubeconfig", str(KUBECONFIG), "get", "--raw", "/readyz"],
                       capture_output=True, text=True, timeout=20)
    return r.returncode == 0


@pytest.fixture(scope="session")
def cluster():
    started_here = False
    if not cluster_running():
        if os.geteuid() != 0:
            cannot_run("no local cluster runs and starting one needs root (containerd, kubelet, iptables)")
        log("starting the local cluster (e2e/cluster/up.sh)")
        t0 = time.monotonic()
        r = subprocess.run(["bash", str(ROOT / "e2e/cluster/up.sh")], capture_output=True, text=True)
        if r.returncode != 0:
            cannot_run(f"e2e/cluster/up.sh failed ({r.returncode}):\n{r.stderr[-3000:]}")
        record("cluster_start_s", round(time.monotonic() - t0, 1))
        started_here = True
    else:
        log("using the running local cluster")
        RESULTS["cluster_start_s"] = "already running"
    os.environ["KUBECONFIG"] = str(KUBECONFIG)
    yield KUBECONFIG
    if started_here and not e2e.env_flag("E2E_KEEP_CLUSTER"):
        log("stopping the local cluster (e2e/cluster/down.sh)")
        subprocess.run(["bash", str(ROOT / "e2e/cluster/down.sh")], capture_output=True, text=True)


@pytest.fixture(scope="session")
def operator(cluster):
    missing = [str(p) for p in IMAGES if not p.exists()]
    if missing:
        cannot_run(f"image archives missing: {missing}: run `make images`")
    t0 = time.monotonic()
    subprocess.run(["bash", str(ROOT / "e2e/cluster/load-image.sh"), *map(str, IMAGES)],
                   check=True, capture_output=True, text=True)
    record("images_load_s", round(time.monotonic() - t0, 1))

    # Another operator of this chart (`make demo`'s) would reconcile our
    # ModelDeployments too, and its leader would not be the one the tests kill:
    # the local cluster is ours, so remove it (`make demo` installs it again).
    releases = json.loads(helm("list", "-A", "-o", "json").stdout or "[]")
    for r in releases:
        if r["chart"].startswith("ferrite-") and (r["name"], r["namespace"]) != (RELEASE, RELEASE_NS):
            log(f"uninstalling the other ferrite release {r['namespace']}/{r['name']} (make demo re-creates it)")
            helm("uninstall", r["name"], "-n", r["namespace"], "--wait", "--timeout", "120s")
    helm("uninstall", RELEASE, "-n", RELEASE_NS, "--wait", check=False)

    t0 = time.monotonic()
    try:
        helm("install", RELEASE, str(ROOT / "charts/ferrite"), "-n", RELEASE_NS, "--create-namespace",
             "--set", "image.pullPolicy=Never", "--set", "serverImage.pullPolicy=Never",
             "--set", "logFormat=text",
             # The node model cache: the directory e2e/cluster/up.sh made for it.
             "--set", f"modelCache.hostPath={e2e.cluster_env()['FERRITE_MODEL_CACHE_DIR']}",
             "--wait", "--timeout", "180s")
    except AssertionError:
        # "context deadline exceeded" alone says nothing: show why the pods did not start.
        e2e.dump(RELEASE_NS)
        print(kubectl("describe", "node", check=False), flush=True)
        print(subprocess.run(["df", "-h", str(ROOT)], capture_output=True, text=True).stdout, flush=True)
        raise
    record("helm_install_to_operator_ready_s", round(time.monotonic() - t0, 1))
    yield {"release": RELEASE, "namespace": RELEASE_NS}
    if e2e.env_flag("E2E_KEEP_CLUSTER"):
        print(kubectl("-n", RELEASE_NS, "logs", "-l", "app.kubernetes.io/name=ferrite", "--tail=40",
                      "--prefix", check=False))
    helm("uninstall", RELEASE, "-n", RELEASE_NS, "--wait", "--timeout", "120s", check=False)
    kubectl("delete", "namespace", RELEASE_NS, "--ignore-not-found", "--wait=true", "--timeout=120s", check=False)


@pytest.fixture(scope="session")
def model_server(cluster, tmp_path_factory):
    directory = tmp_path_factory.mktemp("models")
    e2e.write_models(directory)
    server = e2e.ModelFileServer(directory)
    log(f"model files served at http://{server.host}:{server.port}/")
    yield server
    server.close()


@pytest.fixture
def namespace(cluster, request):
    name = "e2e-" + request.node.name.removeprefix("test_").replace("_", "-")[:40].strip("-")
    kubectl("delete", "namespace", name, "--ignore-not-found", "--wait=true", "--timeout=120s", check=False)
    kubectl("create", "namespace", name)
    yield name
    if request.node.rep_call.failed if hasattr(request.node, "rep_call") else False:
        e2e.dump(name)
    kubectl("delete", "namespace", name, "--wait=true", "--timeout=120s", check=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, "rep_" + report.when, report)


def pytest_terminal_summary(terminalreporter):
    if not RESULTS:
        return
    terminalreporter.section("ferrite end-to-end measurements")
    for key, value in RESULTS.items():
        terminalreporter.write_line(f"{key:55s} {value}")
    out = ROOT / ".cache/e2e"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(RESULTS, indent=2) + "\n")
    terminalreporter.write_line(f"(also in {out / 'results.json'})")
