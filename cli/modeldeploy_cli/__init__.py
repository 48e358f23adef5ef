"""The `modeldeploy` command: `run` starts the operator, `serve -f` serves one model locally.

Each subcommand imports only what it needs, so that `serve` works where only the runtime extra
is installed (no kopf, no cluster code) and `run` where only the operator extra is.
"""
