"""The local Kubernetes control plane that the tests and the demo run against."""
