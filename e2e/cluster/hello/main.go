// hello: a tiny HTTP server (and client) for the local cluster's smoke check.
//
//	hello [-listen :8080]            serve: "hello from <hostname> <remote addr>\n"
//	                                 on every path, "ok\n" on /healthz
//	hello -get URL [-sa] [-timeout]  GET URL, print the body, exit 1 unless 2xx;
//	                                 -sa: trust the pod's ServiceAccount CA and
//	                                 send its token (in-cluster API calls)
//
// Built with CGO_ENABLED=0: a static binary, the image needs nothing else.
package main

import (
	"crypto/tls"
	"crypto/x509"
	"flag"
	"fmt"
	"io"
	"log"
	"net/http"
	"os"
	"strings"
	"time"
)

const saDir = "/var/run/secrets/kubernetes.io/serviceaccount"

func get(url string, sa bool, timeout time.Duration) error {
	client := &http.Client{Timeout: timeout}
	req, err := http.NewRequest("GET", url, nil)
	if err != nil {
		return err
	}
	if sa {
		ca, err := os.ReadFile(saDir + "/ca.crt")
		if err != nil {
			return err
		}
		pool := x509.NewCertPool()
		pool.AppendCertsFromPEM(ca)
		client.Transport = &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}
		tok, err := os.ReadFile(saDir + "/token")
		if err != nil {
			return err
		}
		req.Header.Set("Authorization", "Bearer "+strings.TrimSpace(string(tok)))
	}
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	os.Stdout.Write(body)
	if resp.StatusCode/100 != 2 {
		return fmt.Errorf("%s: %s", url, resp.Status)
	}
	return nil
}

func main() {
	addr := flag.String("listen", ":8080", "address to listen on")
	url := flag.String("get", "", "GET this URL, print the body and exit")
	sa := flag.Bool("sa", false, "with -get: use the pod's ServiceAccount CA and token")
	timeout := flag.Duration("timeout", 5*time.Second, "with -get: request timeout")
	flag.Parse()
	if *url != "" {
		if err := get(*url, *sa, *timeout); err != nil {
			fmt.Fprintln(os.Stderr, "hello -get:", err)
			os.Exit(1)
		}
		return
	}
	host, _ := os.Hostname()
	http.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintln(w, "ok")
	})
	http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "hello from %s %s\n", host, r.RemoteAddr)
	})
	log.Printf("hello: listening on %s", *addr)
	log.Fatal(http.ListenAndServe(*addr, nil))
}
