"""Kubernetes versions every rendered object is validated for: the oldest supported and the newest
that kubernetes-validate ships."""

import kubernetes_validate

KUBERNETES_VERSIONS = ["1.29", kubernetes_validate.latest_version()]
