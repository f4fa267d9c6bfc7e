"""The overlay view in a browser: the graph model (``model.py``, pure) and the HTTP server
(``server.py``, aiohttp on the agent's loop) with its page (``static/``). docs/web.md."""
