// A Go program with a request function, for dogslow's refusal to probe Go
// programs (goroutines move between threads; uretprobes crash Go).
//
//	go_server REQUESTS
//
// Serves REQUESTS requests of 5 ms each, then prints "served N" and exits 0.
package main

import (
	"fmt"
	"os"
	"strconv"
	"time"
)

var served int

//go:noinline
func handleRequest(i int) {
	time.Sleep(5 * time.Millisecond)
	served += i - i + 1
}

func main() {
	requests, err := strconv.Atoi(os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, "usage: go_server REQUESTS")
		os.Exit(2)
	}
	for i := 0; i < requests; i++ {
		handleRequest(i)
	}
	fmt.Printf("served %d\n", served)
}
