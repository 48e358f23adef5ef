// Command kstatus prints the kstatus verdict on one Kubernetes object: the status that Flux
// (and kpt, and `kubectl wait`-style tooling built on cli-utils) computes for it.
//
// It reads the object as JSON on stdin and writes {"status": ..., "message": ...} on stdout,
// for example {"status":"Current","message":"Resource is Ready"}.
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

type verdict struct {
	Status  string `json:"status"`
	Message string `json:"message"`
}

func main() {
	data, err := io.ReadAll(os.Stdin)
	if err != nil {
		fail("reading stdin: %v", err)
	}
	// UnmarshalJSON keeps integers as int64, as kstatus expects of metadata.generation and
	// status.observedGeneration.
	obj := &unstructured.Unstructured{}
	if err := obj.UnmarshalJSON(data); err != nil {
		fail("parsing the object: %v", err)
	}
	result, err := status.Compute(obj)
	if err != nil {
		fail("computing the status: %v", err)
	}
	if err := json.NewEncoder(os.Stdout).Encode(verdict{string(result.Status), result.Message}); err != nil {
		fail("writing the result: %v", err)
	}
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "kstatus: "+format+"\n", args...)
	os.Exit(1)
}
