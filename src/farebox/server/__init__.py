"""The server side: the route table, the gate engine, and its ASGI and WSGI faces."""
