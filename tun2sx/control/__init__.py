"""Control: how tun2sx is configured, started, watched and stopped.

`app` checks the settings and runs one instance, `config` reads the TOML
file, `cli` the flags, `api` is the embedding entry point, `stats` the
counters and their endpoint, `workers` the multi-queue processes, and
`autoroute` the routes and rules of --auto-route.
"""
