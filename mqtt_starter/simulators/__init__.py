"""Stand-ins for the sites, written from their contract pages (qrs-api.md, qlik-cloud-api.md):
real HTTPS servers for tests and the demo. They import nothing from the client side."""
