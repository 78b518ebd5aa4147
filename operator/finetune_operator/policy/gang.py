"""The decide step's view of gang scheduling (spec.gang), pure like the rest of policy.

Queued: the attempt's gang waits for its scheduler to take it whole. Kueue shows it by the admission
scheduling gate its webhook puts on every pod of a group until the group's Workload is admitted
(kubernetes-sigs/kueue pkg/controller/jobs/pod/pod_webhook.go Default, gate(); pod_controller.go
removes it from the whole group at admission), and with a topology request by its topology gate
until the admitted gang's domain is injected into the pods. Volcano and Coscheduling show it by
their PodGroup's phase: Volcano's is Pending until its enqueue action accepts the group and Inqueue
until the scheduler binds minMember pods (volcano-sh/apis pkg/apis/scheduling/v1beta1/types.go);
Coscheduling's is Pending until the plugin has placed the group (kubernetes-sigs/scheduler-plugins
apis/scheduling/v1alpha1/types.go). Meanwhile every rank looks unschedulable, which must not count
against startupTimeoutSeconds: the startup clock of a queued gang starts when it is admitted.

One group per attempt: the current attempt's is created before its pods and kept while the attempt
can run; any other attempt's, and the last one's once the job stopped or restarts, is deleted.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime

from finetune_operator import contract
from finetune_operator.api import FineTuneJob
from finetune_operator.api.status import FineTuneJobStatus, Phase
from finetune_operator.policy.actions import Action, CreateAttempt, CreatePodGroup, DeletePodGroup, Event
from finetune_operator.policy.conditions import ConditionType, Reason, condition, set_condition
from finetune_operator.policy.observed import ObservedGroup, ObservedPod

# PodGroup phases in which the scheduler has not yet taken the gang.
WAITING_GROUP_PHASES = {
    "Volcano": {None, "Pending", "Inqueue"},
    "Coscheduling": {None, "Pending"},
}
GROUP_KEPT_IN = frozenset({Phase.QUEUED, Phase.STARTING, Phase.RUNNING})


def waiting(
    job: FineTuneJob, attempt: int, pods: Sequence[ObservedPod], groups: Iterable[ObservedGroup]
) -> str | None:
    """Why the attempt's gang is queued, or None when it is not (or the job has no gang)."""
    gang = job.spec.gang
    if gang is None:
        return None
    if gang.scheduler == "Kueue":
        gated = [p for p in pods if set(contract.KUEUE_GATES) & set(p.gated)]
        if not gated:
            return None
        return (
            f"{len(gated)} of {job.spec.resources.nodes} rank pod(s) wait for Kueue to admit and place "
            f"the gang (LocalQueue {gang.queue_name})"
        )
    if any(p.scheduled or p.started for p in pods):
        return None  # the scheduler has begun placing the gang
    group = next((g for g in groups if g.attempt == attempt), None)
    phase = group.phase if group is not None else None
    if phase not in WAITING_GROUP_PHASES[gang.scheduler]:
        return None
    return f"{gang.scheduler} PodGroup of attempt {attempt} is {phase or 'not yet looked at'}"


def track_queue(
    st: FineTuneJobStatus, why: str | None, now: datetime, events: list[Event]
) -> datetime | None:
    """Record the Queued condition; return when the attempt's startup clock starts (now while queued,
    the admission once admitted, None for a gang that never queued: its pods' creation)."""
    queued = condition(st, ConditionType.QUEUED)
    if why is not None:
        if queued is None or queued.status != "True":
            events.append(Event("Normal", ConditionType.QUEUED, f"attempt {st.attempt}: {why}"))
        set_condition(st, ConditionType.QUEUED, True, Reason.GANG_QUEUED, why, now)
        return now
    if queued is not None and queued.status == "True":
        set_condition(
            st,
            ConditionType.QUEUED,
            False,
            Reason.ADMITTED,
            f"attempt {st.attempt}: the gang was admitted",
            now,
        )
        events.append(Event("Normal", Reason.ADMITTED, f"attempt {st.attempt}: the gang was admitted whole"))
        return now
    return queued.last_transition_time if queued is not None else None


def group_actions(
    job: FineTuneJob, st: FineTuneJobStatus, groups: Iterable[ObservedGroup], actions: list[Action]
) -> list[Action]:
    """`actions` with the PodGroup creates and deletes this status needs: the current attempt's group
    before its pods while the attempt can run, every other group deleted."""
    gang = job.spec.gang
    if gang is None or not gang.uses_pod_group:
        return actions
    uid = job.metadata.uid
    mine = [g for g in groups if g.owner_uid is None or uid is None or g.owner_uid == uid]
    keep = st.attempt if st.phase in GROUP_KEPT_IN else None
    out = list(actions)
    if keep is not None and not any(g.attempt == keep for g in mine):
        creating = next((i for i, a in enumerate(out) if isinstance(a, CreateAttempt)), len(out))
        out.insert(creating, CreatePodGroup(keep))
    out += [DeletePodGroup(a) for a in sorted({g.attempt for g in mine if g.attempt != keep})]
    return out
