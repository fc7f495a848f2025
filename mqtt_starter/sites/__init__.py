"""The Qlik sites: the Backend protocol (base.py), the transport both share (http.py), and the
QRS (qrs.py) and Qlik Cloud (cloud.py) API operations."""
