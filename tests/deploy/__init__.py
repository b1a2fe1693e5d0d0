"""Checks of deploy/: container image, Kubernetes manifests, HAProxy, systemd and compose."""
