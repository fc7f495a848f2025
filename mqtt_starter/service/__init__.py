"""The use case, knowing no protocol: the request service every door calls (requests.py), the
parts a configuration builds (parts.py), following runs (follow.py) and watching every run
(monitor.py, with election.py)."""
