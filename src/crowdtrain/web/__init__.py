"""The web UI's room: dashboard, nodes, data, models, chat and admin pages, mounted on the
server's FastAPI app (issue 6). Until then the server's interactive API docs are at /docs."""
