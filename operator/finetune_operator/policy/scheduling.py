"""What kube-scheduler's Unschedulable message says about a rank pod: it waits for capacity the
cluster lacks right now, or it can never schedule as the cluster is. Pure: text in, a verdict out.

The message is the PodScheduled=False/Unschedulable condition's, which kube-scheduler builds in
pkg/scheduler/framework/types.go `FitError.Error()`:

    "0/<N> nodes are available: <PreFilterMsg>." when a PreFilter plugin rejected the pod, else
    "0/<N> nodes are available: <count> <reason>, <count> <reason>." (a histogram over the nodes, each
    entry "%v %v", sort.Strings'ed, joined with ", "), then " " + the PostFilter message if any.

The PostFilter message of DefaultPreemption (pkg/scheduler/framework/plugins/defaultpreemption/
default_preemption.go `PostFilter`) is "preemption: " + the evaluator's message, itself a FitError
over the nodes (pkg/scheduler/framework/preemption/preemption.go `Preempt`): "No preemption victims
found for incoming pod" for a node where evicting lower-priority pods was tried, "Preemption is not
helpful for scheduling" for one whose failure was UnschedulableAndUnresolvable (nothing evicted
would make it fit). Other PostFilter plugins (DRA: "no new claims to deallocate") are joined before
it with ", ". No nodes at all is pkg/scheduler/schedule_one.go's ErrNoNodesAvailable.

Each node is counted under the reasons of ONE plugin: the framework stops at a node's first failing
Filter plugin (pkg/scheduler/framework/runtime/framework.go `RunFilterPlugins`), and the default
order (pkg/scheduler/apis/config/v1/default_plugins.go) runs NodeUnschedulable, NodeName,
TaintToleration and NodeAffinity before NodeResourcesFit. So a node counted "Insufficient ..." passed
the pod's selector, affinity and tolerations and lacked only free resources.

The rule (documented in docs/architecture.md, "Capacity waits"):
- CAPACITY (wait, however long, unless runPolicy.schedulingTimeoutSeconds): preemption is under way
  (the pod has status.nominatedNodeName, or asynchronous preemption holds it), or there are no nodes
  at all, or at least one node failed only for resources ("Insufficient <resource>", "Too many pods":
  pkg/scheduler/framework/plugins/noderesources/fit.go) - unless the preemption histogram says
  preemption is not helpful on every node: since fit.go marks a request larger than a node's whole
  allocatable Unresolvable, that says no node could ever hold the pod.
- NEVER (fail after startupTimeoutSeconds): every reason is a static one of the cluster's shape - a
  node selector or affinity no node matches, an untolerated taint, a cordoned node, a missing or
  unbindable PersistentVolumeClaim (the plugins' ErrReason constants, listed below).
- UNKNOWN (today's behaviour, fail after startupTimeoutSeconds): anything else, e.g. a gang
  scheduler's own message or a plugin this list does not know.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum


class Placement(StrEnum):
    CAPACITY = "Capacity"
    NEVER = "Never"
    UNKNOWN = "Unknown"


HEAD = re.compile(r"^0/(\d+) nodes are available:\s*")
COUNTED = re.compile(r"^(\d+) (.+)$")
NO_NODES = "no nodes available to schedule pods"  # schedule_one.go ErrNoNodesAvailable
PREEMPTION = "preemption: "
NOT_HELPFUL = "Preemption is not helpful for scheduling"  # preemption.go
# defaultpreemption PreEnqueue while its asynchronous preemption for the pod runs
PREEMPTING = "waiting for the preemption for this pod to be finished"

# noderesources/fit.go: fmt.Sprintf("Insufficient %v", resource) and ErrReasonTooManyPods (older
# releases: "node(s) had too many pods").
CAPACITY_PREFIXES = ("Insufficient ", "Too many pods", "node(s) had too many pods")
# Reasons that do not change until someone changes the cluster or the job:
STATIC_PREFIXES = (
    "node(s) didn't match Pod's node affinity/selector",  # nodeaffinity ErrReasonPod
    "node(s) didn't match scheduler-enforced node affinity",  # nodeaffinity errReasonEnforced
    "pod affinity terms conflict",  # nodeaffinity errReasonConflict (PreFilter)
    "node(s) had untolerated taint",  # tainttoleration: "... taint {k: v}" (1.25-1.32), "... taint(s)"
    "node(s) had taint {",  # tainttoleration before 1.25: "... {k: v}, that the pod didn't tolerate"
    "node(s) had taints that the pod didn't tolerate",  # tainttoleration ErrReasonNotMatch (1.18)
    "node(s) were unschedulable",  # nodeunschedulable ErrReasonUnschedulable (cordoned)
    "node(s) didn't match the requested node name",  # nodename ErrReason
    "node(s) had volume node affinity conflict",  # volumebinding ErrReasonNodeConflict
    "node(s) didn't find available persistent volumes to bind",  # volumebinding ErrReasonBindConflict
    "node(s) unavailable due to one or more pvc(s) bound to non-existent pv(s)",  # ErrReasonPVNotExist
    "pod has unbound immediate PersistentVolumeClaims",  # volumebinding PreFilter
)
# volumebinding PreFilter passes the PVC lister's NotFound on: `persistentvolumeclaim "x" not found`
MISSING_CLAIM = re.compile(r'^persistentvolumeclaim "[^"]*" (not found|is being deleted)$')


@dataclass(frozen=True)
class SchedulerMessage:
    """A FitError message taken apart."""

    nodes: int
    reasons: tuple[tuple[int, str], ...]  # the Filter histogram (or the PreFilter message, counted N)
    preemption: tuple[tuple[int, str], ...] | None = None  # DefaultPreemption's histogram
    prefiltered: bool = False


def _histogram(text: str) -> tuple[tuple[int, str], ...] | None:
    items: list[tuple[int, str]] = []
    for part in text.split(", "):
        counted = COUNTED.match(part)
        if counted is not None:
            items.append((int(counted.group(1)), counted.group(2)))
        elif items:  # a reason with ", " in it (tainttoleration before 1.25: "{k: v}, that the pod...")
            items[-1] = (items[-1][0], f"{items[-1][1]}, {part}")
        else:
            return None  # no count: a PreFilter message
    return tuple(items)


def _section(text: str) -> tuple[str, str]:
    """The first ". "-terminated section and the rest (reasons never contain ". ": resource names
    and taint keys have dots, never followed by a space)."""
    end = text.find(". ")
    if end < 0:
        return text.rstrip(". "), ""
    return text[:end], text[end + 2 :]


def parse(message: str) -> SchedulerMessage | None:
    """The message's parts; None for text that is not a FitError."""
    text = message.strip()
    if text.rstrip(".") == NO_NODES:
        return SchedulerMessage(nodes=0, reasons=())
    head = HEAD.match(text)
    if head is None:
        return None
    nodes = int(head.group(1))
    main, rest = _section(text[head.end() :])
    reasons = _histogram(main)
    prefiltered = reasons is None
    if reasons is None:
        reasons = ((nodes, main),)
    preemption = None
    at = rest.find(PREEMPTION)
    if at >= 0:
        inner = HEAD.match(rest[at + len(PREEMPTION) :])
        if inner is not None:
            tail, _ = _section(rest[at + len(PREEMPTION) + inner.end() :])
            preemption = _histogram(tail)
    return SchedulerMessage(nodes=nodes, reasons=reasons, preemption=preemption, prefiltered=prefiltered)


def _capacity(reason: str) -> bool:
    return reason.startswith(CAPACITY_PREFIXES)


def _static(reason: str) -> bool:
    return reason.startswith(STATIC_PREFIXES) or MISSING_CLAIM.match(reason) is not None


def placement(message: str, *, nominated: bool = False) -> Placement:
    """What the Unschedulable message means for the job (the rule in this module's docstring)."""
    if nominated or PREEMPTING in message:
        return Placement.CAPACITY
    parsed = parse(message)
    if parsed is None:
        return Placement.UNKNOWN
    if parsed.nodes == 0:
        return Placement.CAPACITY  # the cluster has no nodes right now (an autoscaler at zero)
    reasons = [reason for _, reason in parsed.reasons]
    hopeless = bool(parsed.preemption) and all(r == NOT_HELPFUL for _, r in parsed.preemption or ())
    if any(_capacity(r) for r in reasons) and not hopeless:
        return Placement.CAPACITY
    if all(_static(r) or _capacity(r) for r in reasons):
        return Placement.NEVER
    return Placement.UNKNOWN
