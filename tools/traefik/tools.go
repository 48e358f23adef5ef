//go:build tools

// Wrapper module: builds Traefik from the github.com/traefik/traefik/v3 module through the Go module
// proxy. `go install traefik@version` refuses the module because its go.mod has replace directives;
// this module repeats them (see go.mod) and builds the command from here.
package tools

import _ "github.com/traefik/traefik/v3/cmd/traefik"
