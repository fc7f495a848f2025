"""A Qlik Cloud tenant in the shape of its public API, for tests and the demo."""
