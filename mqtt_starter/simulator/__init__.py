"""The QRS simulator: a real HTTPS server that follows qrs-api.md, for tests and the demo.

It imports nothing from the client side (qrs_query, qrs_client, resolution): its filter parser
and the client's filter builder are two independent readings of the QRS documentation.
"""
