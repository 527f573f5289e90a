"""Talking to upstreams: connections, pools, target choice, outlier ejection, active checks."""
