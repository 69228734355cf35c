// A stand-in for the Go aws-outbound-jwt-proxy's forwarding path: net/http/httputil's
// ReverseProxy with a fixed Authorization header, flushing at once. Standard library
// only; run.py builds it with `go build` when Go is installed (never downloads anything).
package main

import (
	"flag"
	"log"
	"net/http"
	"net/http/httputil"
	"net/url"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:8083", "host:port to listen on (loopback)")
	upstream := flag.String("upstream", "http://127.0.0.1:8081", "upstream base URL")
	flag.Parse()
	target, err := url.Parse(*upstream)
	if err != nil {
		log.Fatal(err)
	}
	proxy := httputil.NewSingleHostReverseProxy(target)
	proxy.FlushInterval = -1
	transport := http.DefaultTransport.(*http.Transport).Clone()
	transport.Proxy = nil
	transport.MaxIdleConnsPerHost = 256
	proxy.Transport = transport
	director := proxy.Director
	proxy.Director = func(r *http.Request) {
		director(r)
		r.Host = target.Host
		r.Header.Set("Authorization", "Bearer go-fixed-token")
	}
	log.Fatal(http.ListenAndServe(*listen, proxy))
}
