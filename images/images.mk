# images/images.mk: OCI images of ferrite-server and ferrite-operator, built
# without a container daemon by images/build-oci.py (Python standard library).
# Included from the top-level Makefile (`include images/images.mk`); uses its
# `ort` target and ORT_LIB.
#
#   make images        .cache/images/ferrite-{server,server-cuda,operator}.oci.tar, each with its
#                      SBOM beside it (ferrite-*.cdx.json, CycloneDX 1.5, images/sbom.py):
#                      the crates linked in, the Debian packages of the libraries
#                      copied from this machine, the ONNX Runtime wheel
#   make images-load   import both into the containerd at CONTAINERD_ADDRESS
#                      (namespace k8s.io, where the kubelet looks)
#   make images-check  validate the archives (layout, digests, config, libraries,
#                      no shell, reproducible)
#   make images-smoke  run them with containerd + runc: server infers on its demo
#                      model as uid 65532 on a read-only root, operator crdgen
#                      (a private containerd unless IMAGES_SMOKE_ADDRESS is set)
#
# Images are named docker.io/library/ferrite-{server,operator}:<version>, which
# is what `ferrite-server:<version>` in a pod spec (the chart's default) resolves to.

IMAGES_DIR      := $(patsubst %/,%,$(dir $(lastword $(MAKEFILE_LIST))))
IMAGES_OUT      := $(CURDIR)/.cache/images
IMAGE_VERSION   ?= $(shell sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' Cargo.toml)
IMAGE_REGISTRY  ?= docker.io/library
IMAGE_REVISION  ?= $(shell git rev-parse HEAD 2>/dev/null)
IMAGE_SOURCE    ?= $(shell git remote get-url origin 2>/dev/null)
# Reproducible: the image's creation time is the commit's.
IMAGE_EPOCH     ?= $(shell git log -1 --format=%ct 2>/dev/null || echo 0)
# IMAGE_PROFILE=debug packs the debug binaries (debug sections stripped) that
# `make test` has already built: its end-to-end run then skips a release build
# (about 15 minutes on a fresh 2-core machine). Users' images are release.
IMAGE_PROFILE   ?= release
RELEASE_DIR     := $(CURDIR)/target/$(IMAGE_PROFILE)
IMAGE_BUILD_FLAGS := $(if $(filter debug,$(IMAGE_PROFILE)),--strip-debug)
CONTAINERD_ADDRESS ?= /run/containerd/containerd.sock
CTR             ?= ctr

SERVER_IMAGE    := $(IMAGES_OUT)/ferrite-server.oci.tar
# The CUDA variant: ONNX Runtime from the pinned onnxruntime-gpu wheel and the
# CUDA 13 libraries its CUDA provider needs, from NVIDIA's wheels (docs/gpu.md).
CUDA_IMAGE      := $(IMAGES_OUT)/ferrite-server-cuda.oci.tar
CUDA_REQS       := $(IMAGES_DIR)/cuda/requirements.txt
CUDA_WHEELS     := $(CURDIR)/.cache/cuda/wheels
CUDA_LIB        := $(CURDIR)/.cache/cuda/lib
CUDA_IN_IMAGE   := /usr/lib/ferrite
# The driver's library: the NVIDIA container runtime mounts it into GPU pods.
CUDA_DRIVER_LIB := libcuda.so.1
CUDA_PLATFORMS  := manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
OPERATOR_IMAGE  := $(IMAGES_OUT)/ferrite-operator.oci.tar
ORT_IN_IMAGE    := /usr/lib/ferrite/libonnxruntime.so
SBOM            = SOURCE_DATE_EPOCH=$(IMAGE_EPOCH) python3 $(IMAGES_DIR)/sbom.py

IMAGE_LABELS = \
	--label org.opencontainers.image.version=$(IMAGE_VERSION) \
	--label org.opencontainers.image.revision=$(IMAGE_REVISION) \
	--label org.opencontainers.image.licenses=Apache-2.0 \
	$(if $(IMAGE_SOURCE),--label org.opencontainers.image.source=$(IMAGE_SOURCE))

.PHONY: images images-cpu images-release images-load images-check images-smoke images-cuda cuda-libs

images: $(SERVER_IMAGE) $(CUDA_IMAGE) $(OPERATOR_IMAGE) ## OCI images of ferrite-server (CPU and CUDA) and ferrite-operator (.cache/images), no Docker needed

images-cuda: $(CUDA_IMAGE) ## the ferrite-server-cuda image alone (GPU nodes; docs/gpu.md)

# What the local cluster runs (make e2e, make demo): no GPU there, so not the
# CUDA image (make test checks that one in images/test_images.py).
images-cpu: $(SERVER_IMAGE) $(OPERATOR_IMAGE)

# The wheels (about 1.6 GB) are downloaded once into .cache/cuda/wheels: pip
# checks each against the hashes of images/cuda/requirements.txt and keeps
# what is already there. stage.py takes the libraries out of them (again only
# when the requirements change).
cuda-libs: $(CUDA_LIB)/.staged ## the CUDA image's libraries from the pinned wheels (.cache/cuda/lib)
$(CUDA_LIB)/.staged: $(CUDA_REQS) $(IMAGES_DIR)/cuda/stage.py | $(VENV)/.installed
	@mkdir -p $(CUDA_WHEELS)
	$(PY) -m pip download --quiet --no-deps --require-hashes --only-binary=:all: --python-version 3.11 \
	  $(addprefix --platform ,$(CUDA_PLATFORMS)) -r $(CUDA_REQS) -d $(CUDA_WHEELS)
	python3 $(IMAGES_DIR)/cuda/stage.py --requirements $(CUDA_REQS) --wheels $(CUDA_WHEELS) --out $(CUDA_LIB)

# One layer per library (the big ones change rarely and are shared by pulls of
# later versions), the server binary last; the libraries as shipped (--lib: not
# stripped, so the SBOM's hashes are the wheels' files). gzip level 6 (zlib's
# default; 9 costs far more time on 2.3 GB for little), and compressed layers
# kept by digest in .cache/images/layers: a rebuild recompresses only the
# server's layer.
$(CUDA_IMAGE): images-release cuda-libs $(IMAGES_DIR)/build-oci.py $(IMAGES_DIR)/sbom.py FORCE
	SOURCE_DATE_EPOCH=$(IMAGE_EPOCH) python3 $(IMAGES_DIR)/build-oci.py $(IMAGE_BUILD_FLAGS) --gzip-level 6 \
	  --layer-cache $(CURDIR)/.cache/images/layers \
	  --ref $(IMAGE_REGISTRY)/ferrite-server-cuda:$(IMAGE_VERSION) -o $@ \
	  --lib-dir $(CUDA_LIB) --allow-missing $(CUDA_DRIVER_LIB) \
	  $$(cd $(CUDA_LIB) && for f in lib*; do printf -- '--lib %s:%s ' $(CUDA_LIB)/$$f $(CUDA_IN_IMAGE)/$$f; done) \
	  --elf $(RELEASE_DIR)/ferrite-server:/usr/bin/ferrite-server \
	  --entrypoint /usr/bin/ferrite-server \
	  --env ORT_DYLIB_PATH=$(CUDA_IN_IMAGE)/libonnxruntime.so \
	  --env LD_LIBRARY_PATH=$(CUDA_IN_IMAGE) \
	  --env NVIDIA_DRIVER_CAPABILITIES=compute,utility \
	  --env "NVIDIA_REQUIRE_CUDA=cuda>=13.0" \
	  --expose 8000 --expose 8001 --expose 8002 \
	  --label org.opencontainers.image.title=ferrite-server-cuda \
	  --label "org.opencontainers.image.description=ferrite model server on NVIDIA GPUs: ONNX Runtime's CUDA provider" \
	  $(IMAGE_LABELS)
	$(SBOM) $@ -o $(@:.oci.tar=.cdx.json) --name ferrite-server-cuda --version $(IMAGE_VERSION) \
	  --cargo /usr/bin/ferrite-server=ferrite-server --wheels $(CUDA_LIB)/provenance.json=$(CUDA_IN_IMAGE)
	python3 $(IMAGES_DIR)/check.py $@ --allow-missing $(CUDA_DRIVER_LIB) \
	  --ldd-in-image ferrite-server-cuda.oci.tar:$(CUDA_IN_IMAGE)/libonnxruntime_providers_cuda.so \
	  --ldd-in-image ferrite-server-cuda.oci.tar:$(CUDA_IN_IMAGE)/libonnxruntime.so \
	  --ldd-in-image ferrite-server-cuda.oci.tar:/usr/bin/ferrite-server

# Cargo decides what is stale; the archives are rewritten each time (a few
# seconds) and are byte-identical when nothing changed.
images-release:
	cargo build $(if $(filter release,$(IMAGE_PROFILE)),--release) -p ferrite-server -p ferrite-operator

$(SERVER_IMAGE): images-release ort $(IMAGES_DIR)/build-oci.py $(IMAGES_DIR)/sbom.py FORCE
	SOURCE_DATE_EPOCH=$(IMAGE_EPOCH) python3 $(IMAGES_DIR)/build-oci.py $(IMAGE_BUILD_FLAGS) \
	  --ref $(IMAGE_REGISTRY)/ferrite-server:$(IMAGE_VERSION) -o $@ \
	  --elf $(ORT_LIB):$(ORT_IN_IMAGE) \
	  --elf $(RELEASE_DIR)/ferrite-server:/usr/bin/ferrite-server \
	  --entrypoint /usr/bin/ferrite-server \
	  --env ORT_DYLIB_PATH=$(ORT_IN_IMAGE) \
	  --expose 8000 --expose 8001 --expose 8002 \
	  --label org.opencontainers.image.title=ferrite-server \
	  --label "org.opencontainers.image.description=ferrite model server: Open Inference Protocol over gRPC and HTTP on ONNX Runtime" \
	  $(IMAGE_LABELS)
	$(SBOM) $@ -o $(@:.oci.tar=.cdx.json) --name ferrite-server --version $(IMAGE_VERSION) \
	  --cargo /usr/bin/ferrite-server=ferrite-server \
	  --pypi $(ORT_IN_IMAGE)=onnxruntime==$(ORT_VERSION) --pip-report $(VENV)/pip-report.json

$(OPERATOR_IMAGE): images-release $(IMAGES_DIR)/build-oci.py $(IMAGES_DIR)/sbom.py FORCE
	SOURCE_DATE_EPOCH=$(IMAGE_EPOCH) python3 $(IMAGES_DIR)/build-oci.py $(IMAGE_BUILD_FLAGS) \
	  --ref $(IMAGE_REGISTRY)/ferrite-operator:$(IMAGE_VERSION) -o $@ \
	  --elf $(RELEASE_DIR)/ferrite-operator:/usr/bin/ferrite-operator \
	  --entrypoint /usr/bin/ferrite-operator \
	  --label org.opencontainers.image.title=ferrite-operator \
	  --label "org.opencontainers.image.description=ferrite operator: reconciles ModelDeployments into model-server pods and scales them on queue depth" \
	  $(IMAGE_LABELS)
	$(SBOM) $@ -o $(@:.oci.tar=.cdx.json) --name ferrite-operator --version $(IMAGE_VERSION) \
	  --cargo /usr/bin/ferrite-operator=ferrite-operator

images-load: images-cpu ## import the images into the containerd at CONTAINERD_ADDRESS (namespace k8s.io)
	$(CTR) --address $(CONTAINERD_ADDRESS) -n k8s.io images import --all-platforms $(SERVER_IMAGE)
	$(CTR) --address $(CONTAINERD_ADDRESS) -n k8s.io images import --all-platforms $(OPERATOR_IMAGE)

# Builds everything a second time under .cache/images/repro and compares digests.
images-check: images ## validate the image archives (layout, config, libraries, no shell, reproducible)
	$(MAKE) --no-print-directory -f $(firstword $(MAKEFILE_LIST)) $(IMAGES_OUT)/repro/ferrite-server.oci.tar $(IMAGES_OUT)/repro/ferrite-operator.oci.tar IMAGES_OUT=$(IMAGES_OUT)/repro
	python3 $(IMAGES_DIR)/check.py $(SERVER_IMAGE) $(OPERATOR_IMAGE) \
	  --ldd ferrite-server.oci.tar:/usr/bin/ferrite-server=$(RELEASE_DIR)/ferrite-server \
	  --ldd ferrite-server.oci.tar:$(ORT_IN_IMAGE)=$(ORT_LIB) \
	  --ldd ferrite-operator.oci.tar:/usr/bin/ferrite-operator=$(RELEASE_DIR)/ferrite-operator \
	  --same-as $(SERVER_IMAGE)=$(IMAGES_OUT)/repro/ferrite-server.oci.tar \
	  --same-as $(OPERATOR_IMAGE)=$(IMAGES_OUT)/repro/ferrite-operator.oci.tar

IMAGES_SMOKE_ADDRESS ?=
images-smoke: images-cpu ## run the images with containerd + runc (server inference as uid 65532, operator crdgen)
	CONTAINERD_ADDRESS=$(IMAGES_SMOKE_ADDRESS) bash $(IMAGES_DIR)/smoke.sh $(IMAGES_OUT)

.PHONY: FORCE
FORCE:
