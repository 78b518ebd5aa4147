"""spec.gang: gang scheduling, so a job's ranks start together or wait together, never half-bound.

Off by default. Three schedulers are supported, each through its own published integration:
- Kueue: plain pods in a pod group (the queue-name and group-name labels and the total-count
  annotation); Kueue's webhook gates every pod until the group's Workload is admitted whole.
- Volcano: a PodGroup (minMember = nodes) per attempt, the pods bound to it by annotation and
  scheduled by the volcano scheduler.
- Coscheduling (kubernetes-sigs/scheduler-plugins): its PodGroup per attempt, the pods bound to it
  by label and scheduled by a scheduler that runs the Coscheduling plugin.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from finetune_operator.api.base import DNS_SUBDOMAIN_PATTERN, ApiModel, K8sName, Rule

GangScheduler = Literal["Kueue", "Volcano", "Coscheduling"]
# The scheduler names the projects install under: Volcano's chart deploys "volcano"; scheduler-plugins'
# as-a-second-scheduler chart deploys "scheduler-plugins-scheduler" (manifests/install/charts).
# A queue name travels as a label value (Kueue) and names an object: both limits hold.
QueueName = Annotated[str, Field(pattern=DNS_SUBDOMAIN_PATTERN, max_length=63)]
DEFAULT_SCHEDULER_NAMES: dict[str, str] = {
    "Volcano": "volcano",
    "Coscheduling": "scheduler-plugins-scheduler",
}


class GangSpec(ApiModel):
    """Gang scheduling of the rank pods: every attempt is admitted or scheduled whole."""

    scheduler: GangScheduler = Field(
        description="Kueue (pod-group admission through a LocalQueue), Volcano (a PodGroup per attempt, "
        "scheduled by volcano) or Coscheduling (scheduler-plugins' PodGroup per attempt).",
    )
    queue_name: QueueName | None = Field(
        None,
        description="Kueue: the LocalQueue in the job's namespace (required). Volcano: the Queue of the "
        "PodGroup (left out: volcano's `default`). Not used by Coscheduling.",
    )
    scheduler_name: K8sName | None = Field(
        None,
        description="The rank pods' scheduler. Left out: `volcano` for Volcano, "
        "`scheduler-plugins-scheduler` for Coscheduling, the cluster's default for Kueue.",
    )
    schedule_timeout_seconds: int | None = Field(
        None,
        ge=1,
        le=86400,
        description="Coscheduling only: the PodGroup's scheduleTimeoutSeconds, how long the scheduler "
        "holds a partly placed gang before it releases the nodes and tries again.",
    )

    rules = (
        Rule(
            cel="self.scheduler != 'Kueue' || has(self.queueName)",
            message="Kueue admits pods through a LocalQueue: set gang.queueName to one in the job's "
            "namespace",
            field="queueName",
            check=lambda s: s.scheduler != "Kueue" or s.queue_name is not None,
        ),
        Rule(
            cel="self.scheduler != 'Coscheduling' || !has(self.queueName)",
            message="Coscheduling has no queues: leave gang.queueName out (or choose Kueue or Volcano)",
            field="queueName",
            check=lambda s: s.scheduler != "Coscheduling" or s.queue_name is None,
        ),
        Rule(
            cel="self.scheduler == 'Coscheduling' || !has(self.scheduleTimeoutSeconds)",
            message="scheduleTimeoutSeconds is a Coscheduling PodGroup setting: leave it out for "
            "Kueue and Volcano",
            field="scheduleTimeoutSeconds",
            check=lambda s: s.scheduler == "Coscheduling" or s.schedule_timeout_seconds is None,
        ),
    )

    def pod_scheduler_name(self) -> str | None:
        return self.scheduler_name or DEFAULT_SCHEDULER_NAMES.get(self.scheduler)

    @property
    def uses_pod_group(self) -> bool:
        """Volcano and Coscheduling need a PodGroup object; Kueue's pod groups are labels only."""
        return self.scheduler != "Kueue"
