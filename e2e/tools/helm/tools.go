//go:build tools

// Package tools records the helm main package so that `go mod tidy` keeps
// every module it needs in go.sum. It is never compiled (build tag "tools").
package tools

import _ "helm.sh/helm/v3/cmd/helm"
