"""The QRS simulator: a real HTTPS server that follows qrs-api.md, for tests and the demo.

It imports nothing from the client side (core/qrs_query, sites/qrs, core/resolution): its
filter parser and the client's filter builder are two independent readings of the QRS
documentation.
"""
