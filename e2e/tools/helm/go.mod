// Helm, pinned on its own: helm v3.19.x is the release line built against the
// Kubernetes 1.34 client libraries, but it brings its own versions of many
// shared dependencies, so it is kept out of ../go.mod (whose graph must stay
// exactly as k8s.io/kubernetes pins it). Built by ../../build-control-plane.sh.
module ferrite.dev/e2e/tools/helm

go 1.24.0

require helm.sh/helm/v3 v3.19.5
