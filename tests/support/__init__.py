"""Test support: real peers (registry, skopeo, token server, fault proxy) started on 127.0.0.1."""
