// Command coredns is CoreDNS with only the plugins the local cluster's
// Corefile uses (e2e/cluster/up.sh), so that its build pulls in the
// Kubernetes client and nothing of the cloud back ends (route53, azure,
// clouddns, etcd, dnstap, ...) that the full release links.
//
// Built by ../../build-control-plane.sh into .cache/k8s/<k8s-version>/bin/coredns.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	// The plugins, each registering itself with the server on import.
	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/forward"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/metrics"
	_ "github.com/coredns/coredns/plugin/ready"
)

// directives is the plugin chain order: the subset of CoreDNS's plugin.cfg
// (the same relative order) that the imports above provide. A directive the
// Corefile names but this list lacks is a startup error, not a silent no-op.
var directives = []string{
	"bind",
	"ready",
	"health",
	"prometheus",
	"errors",
	"log",
	"cache",
	"kubernetes",
	"forward",
}

func init() {
	dnsserver.Directives = directives
}

func main() {
	coremain.Run()
}
