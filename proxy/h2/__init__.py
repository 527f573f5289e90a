"""HTTP/2 connections on the ``h2`` state machine: streams with flow control acknowledged by their consumer."""
