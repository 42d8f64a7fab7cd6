"""gRPC runtime: real peers exchanging meshfl messages over (m)TLS gRPC."""
