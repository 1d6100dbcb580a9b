// hello: a tiny HTTP server for the cluster's smoke check. It answers every
// request with "hello from <hostname> <remote addr>\n" and /healthz with "ok".
// Built with CGO_ENABLED=0: a static binary, the image needs nothing else.
package main

import (
	"flag"
	"fmt"
	"log"
	"net/http"
	"os"
)

func main() {
	addr := flag.String("listen", ":8080", "address to listen on")
	flag.Parse()
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
