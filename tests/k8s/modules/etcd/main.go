// etcd 3.5's server, built from its Go module: the binary is etcdmain.Main, as etcd's own main is.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
