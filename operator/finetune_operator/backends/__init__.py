"""Backends carry out what the decide step asks for: on a cluster (KubernetesBackend) or on one
machine (the local backend). The reconcile pass itself (finetune_operator.reconciler) is shared."""

from finetune_operator.backends.base import Backend, JobKey

__all__ = ["Backend", "JobKey"]
