"""What the operator's builders and the runtime agree on, in one dependency-free place.

The operator writes these names into the pods it builds; the runtime reads them back. Neither
imports the other: both import this package, and it imports nothing but the standard library.

- `flags`: the runtime's commands, flag and environment names, and how settings become argv;
- `paths`: ports, probe paths, volume paths and the artifact file-name rule;
- `values`: quantization and device values, patterns, batching defaults;
- `metrics`: the Prometheus metric names the runtime exports and the operator reads.
"""
