"""Names for the overlay: the name table (``names.py``, pure) and the DNS responder that
serves it (``dns.py``). Knows nothing of links, signaling or the agent: the agent hands the
responder a callable returning the current table."""
