"""Shared test helpers: free ports, policy files, in-process and subprocess sidecars, scripted upstreams."""
