# e2e/e2e.mk: the control plane for operator and end-to-end tests.
# Included from the top-level Makefile (`include e2e/e2e.mk`).
#
# K8S_BIN             where the pinned binaries live: .cache/k8s/<k8s-version>/bin
# KUBEBUILDER_ASSETS  the same dir, exported: controller-runtime's envtest (and the
#                     `envtest` crate) look for `etcd` and `kube-apiserver` there.

E2E_DIR := $(patsubst %/,%,$(dir $(lastword $(MAKEFILE_LIST))))
K8S_BIN := $(shell $(E2E_DIR)/build-control-plane.sh --print-bin-dir)
export K8S_BIN
export KUBEBUILDER_ASSETS := $(K8S_BIN)

# What `make control-plane` builds; later steps add kube-scheduler kubelet kube-proxy.
CONTROL_PLANE_BINS ?= etcd kube-apiserver kube-controller-manager kubectl helm

.PHONY: control-plane control-plane-up control-plane-down

control-plane: ## build etcd, kube-apiserver, kube-controller-manager, kubectl, helm from pinned Go modules (cached)
	$(E2E_DIR)/build-control-plane.sh $(CONTROL_PLANE_BINS)

control-plane-up: control-plane ## start etcd + kube-apiserver + kube-controller-manager on loopback; prints KUBECONFIG
	$(E2E_DIR)/start-apiserver.sh start --controller-manager

control-plane-down: ## stop what control-plane-up started and remove its state
	$(E2E_DIR)/start-apiserver.sh stop

# The local single-node cluster (e2e/cluster/): containerd + runc + CNI bridge
# from Debian, the components below from pinned Go modules. Needs root.
CLUSTER_BINS ?= etcd kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl coredns

.PHONY: cluster-bins cluster-up cluster-down cluster-check

cluster-bins: ## build the binaries the local cluster runs (cached)
	$(E2E_DIR)/build-control-plane.sh $(CLUSTER_BINS)

cluster-up: cluster-bins ## start the local single-node cluster; prints the kubeconfig path (.cache/k8s/cluster/kubeconfig)
	$(E2E_DIR)/cluster/up.sh

cluster-down: ## stop the local cluster and undo all it did (processes, mounts, bridge, iptables, sysctls)
	$(E2E_DIR)/cluster/down.sh

cluster-check: ## smoke check of the running local cluster: pods, Service routing, in-cluster API, isolation
	$(E2E_DIR)/cluster/check.sh

# End-to-end tests and the cluster demo (issue 4). Both use the local cluster
# (started when none runs; needs root), the images and the Helm chart.
#   make e2e            pytest e2e/tests: Helm install, apply, infer, autoscale,
#                       rollout, pod and operator kills, bad models, deletion.
#                       Prints the measured times (.cache/e2e/results.json).
#                       E2E_KEEP_CLUSTER=1 keeps a cluster the tests started;
#                       E2E_ARGS="-k test_1" selects scenarios.
#   make demo           e2e/demo.sh (the README's first command); USE_CURRENT_CONTEXT=1
#                       uses the current kubeconfig's cluster instead of the local one
#   make demo-down      removes the demo (and the cluster, if the demo started it)
E2E_ARGS ?=

.PHONY: e2e demo demo-down

e2e: venv images-cpu cluster-bins control-plane models ## end-to-end tests on the local single-node cluster (needs root)
	$(PY) -m pytest -v -s -p no:cacheprovider e2e/tests $(E2E_ARGS)

demo: venv images-cpu cluster-bins control-plane ## local cluster + Helm install + example ModelDeployment + tritonclient inference
	bash $(E2E_DIR)/demo.sh

demo-down: ## remove what demo made (and the cluster, if it started it)
	bash $(E2E_DIR)/demo.sh down
