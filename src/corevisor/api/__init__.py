"""corevisor's control plane: a daemon holding a running System, its HTTP API and clients.

- daemon.py: `corevisor serve`: the System, its event history, the socket's life;
- server.py: HTTP/1.1 on a unix socket, one thread per connection, hostile-client limits;
- routes.py: the endpoints (what each does with the System) and their OpenAPI entries;
- openapi.py: the OpenAPI 3.1 document, generated from routes.py and config/schema.py;
- metrics.py: Prometheus text (and JSON) from the System's counters;
- client.py, ctl.py, top.py: `corevisor ctl` and `corevisor top`, clients of the API;
- commands.py: the command lines of serve, ctl and top.

Nothing here is imported by `corevisor run`: the CLI reaches this package only for those
three commands (tests/unit/test_api_imports.py keeps it so). docs/api.md is the reference.
"""
