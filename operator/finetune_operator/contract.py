"""The pod contract between the operator and the trainer, in one place both sides import.

The operator builds pods from these names; the trainer reads its environment and reports back
through these exit codes. Changing a value here changes it on both sides at once.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Final

API_GROUP: Final = "finetune.dev"
API_VERSION: Final = "v1alpha1"
KIND: Final = "FineTuneJob"
PLURAL: Final = "finetunejobs"
SINGULAR: Final = "finetunejob"
SHORT_NAMES: Final = ("ftj",)
CATEGORIES: Final = ("finetune",)

# Labels on every child object; the operator finds a job's children by them.
LABEL_JOB: Final = f"{API_GROUP}/job-name"
LABEL_ATTEMPT: Final = f"{API_GROUP}/attempt"
LABEL_RANK: Final = f"{API_GROUP}/node-rank"
LABEL_APP_NAME: Final = "app.kubernetes.io/name"
LABEL_MANAGED_BY: Final = "app.kubernetes.io/managed-by"

# Gang schedulers' pod metadata (spec.gang). Kueue's plain-pod integration:
# kubernetes-sigs/kueue pkg/controller/constants/constants.go (QueueLabel) and
# pkg/controller/jobs/pod/constants/constants.go (GroupNameLabel, GroupTotalCountAnnotation,
# RetriableInGroupAnnotationKey, SchedulingGateName: the gate its webhook puts on every managed pod
# until the group's Workload is admitted). Kueue's topology-aware scheduling annotations:
# keps/2724-topology-aware-scheduling. Volcano: volcano-sh/apis pkg/apis/scheduling/v1beta1/labels.go
# (KubeGroupNameAnnotationKey). scheduler-plugins coscheduling: apis/scheduling/v1alpha1/types.go
# (PodGroupLabel).
KUEUE_QUEUE_LABEL: Final = "kueue.x-k8s.io/queue-name"
KUEUE_GROUP_LABEL: Final = "kueue.x-k8s.io/pod-group-name"
KUEUE_TOTAL_COUNT_ANNOTATION: Final = "kueue.x-k8s.io/pod-group-total-count"
KUEUE_RETRIABLE_ANNOTATION: Final = "kueue.x-k8s.io/retriable-in-group"
KUEUE_ROLE_HASH_ANNOTATION: Final = "kueue.x-k8s.io/role-hash"  # RoleHashAnnotation: the PodSet's name
KUEUE_ROLE: Final = "ranks"
KUEUE_ADMISSION_GATE: Final = "kueue.x-k8s.io/admission"
# With a topology request the webhook adds a second gate, removed once the admitted gang's domain is
# injected as nodeSelectors (apis/kueue/v1alpha1 TopologySchedulingGate), and takes each pod's index
# in the group from the label this annotation names (PodGroupPodIndexLabelAnnotation).
KUEUE_TOPOLOGY_GATE: Final = "kueue.x-k8s.io/topology"
KUEUE_GATES: Final = (KUEUE_ADMISSION_GATE, KUEUE_TOPOLOGY_GATE)
KUEUE_POD_INDEX_LABEL_ANNOTATION: Final = "kueue.x-k8s.io/pod-group-pod-index-label"
KUEUE_REQUIRED_TOPOLOGY_ANNOTATION: Final = "kueue.x-k8s.io/podset-required-topology"
KUEUE_PREFERRED_TOPOLOGY_ANNOTATION: Final = "kueue.x-k8s.io/podset-preferred-topology"
VOLCANO_GROUP_ANNOTATION: Final = "scheduling.k8s.io/group-name"
COSCHEDULING_GROUP_LABEL: Final = "scheduling.x-k8s.io/pod-group"
# Pod metadata keys only the operator writes: its labels above, the gang schedulers' group keys, and
# anything under its API group.
OPERATOR_LABEL_KEYS: Final = (
    LABEL_JOB,
    LABEL_ATTEMPT,
    LABEL_RANK,
    LABEL_APP_NAME,
    LABEL_MANAGED_BY,
    KUEUE_QUEUE_LABEL,
    KUEUE_GROUP_LABEL,
    COSCHEDULING_GROUP_LABEL,
)
OPERATOR_ANNOTATION_KEYS: Final = (
    KUEUE_TOTAL_COUNT_ANNOTATION,
    KUEUE_RETRIABLE_ANNOTATION,
    KUEUE_ROLE_HASH_ANNOTATION,
    KUEUE_POD_INDEX_LABEL_ANNOTATION,
    KUEUE_REQUIRED_TOPOLOGY_ANNOTATION,
    KUEUE_PREFERRED_TOPOLOGY_ANNOTATION,
    VOLCANO_GROUP_ANNOTATION,
)
RESERVED_METADATA_PREFIX: Final = f"{API_GROUP}/"

# torchrun's rendezvous between node ranks.
ENV_NNODES: Final = "NNODES"
ENV_NPROC_PER_NODE: Final = "NPROC_PER_NODE"
ENV_NODE_RANK: Final = "NODE_RANK"
ENV_MASTER_ADDR: Final = "MASTER_ADDR"
ENV_MASTER_PORT: Final = "MASTER_PORT"
MASTER_PORT: Final = 29500

# Which job and attempt a rank belongs to (where its checkpoints go is in its config).
ENV_JOB_NAME: Final = "FTJOB_NAME"
ENV_JOB_NAMESPACE: Final = "FTJOB_NAMESPACE"
ENV_ATTEMPT: Final = "FTJOB_ATTEMPT"
ENV_SCRATCH_DIR: Final = "FTJOB_SCRATCH_DIR"
ENV_TERMINATION_LOG: Final = "FTJOB_TERMINATION_LOG"

# Storage credentials: only ever injected as secretKeyRefs to the user's Secret. The keys are the
# ones boto3 reads from the environment, so the Secret is written once and works everywhere.
SECRET_KEY_ACCESS_KEY_ID: Final = "AWS_ACCESS_KEY_ID"
SECRET_KEY_SECRET_ACCESS_KEY: Final = "AWS_SECRET_ACCESS_KEY"
SECRET_KEY_SESSION_TOKEN: Final = "AWS_SESSION_TOKEN"
REQUIRED_SECRET_KEYS: Final = (SECRET_KEY_ACCESS_KEY_ID, SECRET_KEY_SECRET_ACCESS_KEY)
OPTIONAL_SECRET_KEYS: Final = (SECRET_KEY_SESSION_TOKEN,)
ENV_S3_ENDPOINT: Final = "AWS_ENDPOINT_URL_S3"
# A model hub token (model.tokenSecret), only ever a secretKeyRef. The name is the one the Hugging Face
# hub client reads from the environment, so the trainer's downloads use it with no code of ours.
ENV_HF_TOKEN: Final = "HF_TOKEN"
DEFAULT_TOKEN_SECRET_KEY: Final = "HF_TOKEN"
ENV_S3_REGION: Final = "AWS_DEFAULT_REGION"

# Communication defaults. NCCL's own collective timeout is 10 minutes; a hung rank should be noticed
# well before that so the operator can restart the gang instead of idling the whole allocation.
COMMUNICATION_ENV: Final = {
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC": "180",
    "TORCH_NCCL_DUMP_ON_TIMEOUT": "0",
    "NCCL_DEBUG": "WARN",
    "PYTHONUNBUFFERED": "1",
}

# Paths inside the trainer container.
CONFIG_DIR: Final = "/etc/finetune"
CONFIG_FILE_NAME: Final = "config.json"
CONFIG_PATH: Final = f"{CONFIG_DIR}/{CONFIG_FILE_NAME}"
SCRATCH_DIR: Final = "/scratch"
SHM_DIR: Final = "/dev/shm"
TERMINATION_LOG: Final = "/dev/termination-log"

# The pod's own volumes; user volumes may not take these names or mount over these paths.
CONFIG_VOLUME: Final = "finetune-config"
SHM_VOLUME: Final = "finetune-shm"
SCRATCH_VOLUME: Final = "finetune-scratch"
RESERVED_VOLUME_PREFIX: Final = "finetune-"
RESERVED_PATHS: Final = (CONFIG_DIR, SHM_DIR, SCRATCH_DIR, TERMINATION_LOG)

CONTAINER_NAME: Final = "trainer"
RENDEZVOUS_PORT_NAME: Final = "rendezvous"
TRAINER_UID: Final = 1000


class ExitCode(IntEnum):
    """Trainer exit codes; the operator classifies a failed rank by them (docs/operations.md)."""

    OK = 0
    INVALID_CONFIG = 2
    INPUT_NOT_FOUND = 3
    # A step did not fit in GPU or host memory: the same config fails the same way, so it is not a
    # blind retry (adapting the batch to fit is the operator's to add, not the trainer's).
    OUT_OF_MEMORY = 4
    TRANSIENT = 75  # EX_TEMPFAIL: storage unreachable, collective timeout
    STORAGE_REFUSED = 77  # EX_NOPERM: storage refused the credentials, or the bucket does not exist
    TERMINATED = 143  # 128 + SIGTERM: preempted or drained, after the emergency checkpoint


# How long the launcher gives the ranks after a SIGTERM before it kills them: the pod's grace period
# minus this margin, so the emergency checkpoint finishes before the kubelet's own SIGKILL.
ENV_SHUTDOWN_TIMEOUT: Final = "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"
SHUTDOWN_MARGIN_SECONDS: Final = 5
# Where each local rank leaves its one-line failure reason for the launcher to pick from.
ENV_RANK_TERMINATION_DIR: Final = "FTJOB_RANK_TERMINATION_DIR"


# In-place restarts (runPolicy.inPlaceRestarts): how many times this attempt's launcher may restart
# its training processes inside the running pod, and the backoff before each (seconds, comma
# separated), both worked out by the operator from the job's remaining application budget.
ENV_IN_PLACE_RESTARTS: Final = "FTJOB_IN_PLACE_RESTARTS"
ENV_IN_PLACE_BACKOFF: Final = "FTJOB_IN_PLACE_BACKOFF"
# Exits a fresh process may get past: an unexpected exception (1) and a transient failure (75).
# Out of memory, an invalid config, a missing input and refused storage fail the same way again; 143
# is the pod being stopped, and a SIGKILL (137) is most often the kernel's OOM killer. Another signal
# death (a segfault, an abort) is an application failure like exit 1.
IN_PLACE_EXITS: Final = frozenset({1, ExitCode.TRANSIENT})
SIGKILL_EXIT: Final = 137


def restartable_in_place(code: int) -> bool:
    """Whether a rank that exited with `code` is restarted inside its pod rather than with a new gang."""
    return code in IN_PLACE_EXITS or (128 < code < 160 and code not in (SIGKILL_EXIT, ExitCode.TERMINATED))


def launch_command(config_path: str = CONFIG_PATH) -> list[str]:
    """The command every node rank runs: torchrun's arguments, through the trainer's launcher.

    The launcher runs torchrun in-process and passes the first failed rank's exit code and reason on
    as the pod's own (torchrun alone exits 1 for any failed rank, and with a traceback on SIGTERM,
    which would hide the failure class). The rendezvous is torchrun's c10d one, hosted by node rank
    0 at MASTER_ADDR: unlike a static rendezvous it can meet again, which is what an in-place restart
    of the worker group needs; the node rank stays the pod's (NODE_RANK, read by the trainer), and
    the rendezvous id is the attempt, so no rank ever meets a stale gang. Kubernetes expands the
    $(VAR) references from the env."""
    return [
        "python",
        "-m",
        "finetune_trainer.launch",
        f"--nnodes=$({ENV_NNODES})",
        f"--nproc-per-node=$({ENV_NPROC_PER_NODE})",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=$({ENV_MASTER_ADDR}):$({ENV_MASTER_PORT})",
        f"--rdzv-id=$({ENV_JOB_NAME})-$({ENV_ATTEMPT})",
        f"--max-restarts=$({ENV_IN_PLACE_RESTARTS})",
        "-m",
        "finetune_trainer",
        "--config",
        config_path,
    ]


# Env names the operator owns; a user's extra env may not override them.
RESERVED_ENV: Final = frozenset(
    {
        ENV_NNODES,
        ENV_NPROC_PER_NODE,
        ENV_NODE_RANK,
        ENV_MASTER_ADDR,
        ENV_MASTER_PORT,
        ENV_JOB_NAME,
        ENV_JOB_NAMESPACE,
        ENV_ATTEMPT,
        ENV_SCRATCH_DIR,
        ENV_TERMINATION_LOG,
        ENV_SHUTDOWN_TIMEOUT,
        ENV_RANK_TERMINATION_DIR,
        ENV_IN_PLACE_RESTARTS,
        ENV_IN_PLACE_BACKOFF,
        *REQUIRED_SECRET_KEYS,
        *OPTIONAL_SECRET_KEYS,
        ENV_HF_TOKEN,
    }
)
