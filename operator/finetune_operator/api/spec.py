"""FineTuneJob spec: what to train, on what data, how, where, and what to do when it fails.

These models are the single source of truth: the CRD (crds/), docs/api.md and the trainer's config
are all generated from them. Defaults fit one node of 8 GPUs; a minimal manifest names only the
model, the dataset and the checkpoint uri.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

from pydantic import Field

from finetune_operator import contract
from finetune_operator.api.base import (
    ANY_STORAGE_URI,
    ApiModel,
    K8sName,
    ModelSource,
    Quantity,
    Rule,
    ShortString,
    StorageUri,
)
from finetune_operator.api.kubernetes import KubernetesVolume, KubernetesVolumeMount
from finetune_operator.api.pod_settings import (
    EXTENDED_RESOURCE_RULES,
    EnvVar,
    LabelKey,
    PodMetadata,
    ScratchSpec,
    SecretKeySelector,
    Toleration,
    volume_rules,
)


class ModelSpec(ApiModel):
    """The base model to fine-tune, in Hugging Face format."""

    source: ModelSource = Field(
        description="Where the model is: s3://bucket/prefix, file:///mounted/path, or a hub id "
        "(org/name) when the cluster can reach a model hub."
    )
    revision: ShortString | None = Field(
        None, description="Hub revision (branch, tag or commit) of a hub id."
    )
    tokenizer: ModelSource | None = Field(
        None, description="Tokenizer location when it differs from the model's; same forms as source."
    )
    trust_remote_code: bool = Field(
        False, description="Run Python code shipped with the model. Leave off unless you trust the source."
    )
    token_secret: SecretKeySelector | None = Field(
        None,
        description="A Secret key holding a model hub token (gated models such as Llama). It reaches "
        f"the trainer only as {contract.ENV_HF_TOKEN}, a secretKeyRef: the operator never reads it.",
    )


RecordShape = Literal["text", "promptCompletion", "chat", "alpaca", "preference"]
RoleNames = Annotated[
    list[Annotated[str, Field(min_length=1, max_length=64)]], Field(min_length=1, max_length=16)
]
DATASET_EXTENSIONS = (".jsonl", ".json", ".parquet", ".csv")
DATASET_EXTENSIONS_TEXT = f"{', '.join(DATASET_EXTENSIONS[:-1])} or {DATASET_EXTENSIONS[-1]}"
NAMED_CHAT_TEMPLATES = ("llama3", "llama3.1", "llama2", "mistral", "chatml")


class DatasetSource(ApiModel):
    """One dataset in the training mixture."""

    uri: StorageUri = Field(description="A file or a prefix of files (s3:// or file://).")
    name: ShortString | None = Field(None, description="Label used in logs and data reports.")
    format: Literal["jsonl", "json", "parquet", "csv"] | None = Field(
        None,
        description="File format. JSON Lines, a JSON array, a JSON object holding the list and parquet "
        "are told apart by content whatever this says; CSV is read as CSV only when named here or by "
        "a .csv extension.",
    )
    records_field: ShortString | None = Field(
        None,
        description="For a JSON file that is one object: the key holding the list of records. Left "
        "out: the first key whose value is a list.",
    )
    shape: RecordShape = Field(
        "text",
        description="Record shape: text (one text field), promptCompletion (loss only on the "
        "completion), chat (a list of messages, loss only on assistant turns and tool calls: OpenAI "
        "`messages` with string or typed-part content, tool_calls and tool messages, or ShareGPT "
        "`conversations` of from/value, found by themselves), alpaca (instruction/input/output, "
        "loss only on the output), or preference (a prompt with a chosen and a rejected answer, for "
        "training.objective dpo: TRL's prompt/chosen/rejected as text or messages, its implicit-prompt "
        "form where chosen and rejected are whole conversations, or LLaMA-Factory's ranking format, "
        "a conversation under messagesField with chosen and rejected as single messages).",
    )
    prompt_format: Literal["auto", "chat", "plain"] = Field(
        "auto",
        description="How promptCompletion and alpaca records are laid out: chat (a user turn and an "
        "assistant turn in the chat template, ending with its end-of-turn token), plain (the prompt "
        "text, for alpaca the Alpaca prompt, then the completion and end-of-sequence), or auto (chat "
        "when the tokenizer or dataset.chatTemplate gives a template, plain otherwise).",
    )
    weight: float = Field(
        1.0,
        gt=0,
        le=1000,
        description="Relative share of this source in the mixture (weights are normalised).",
    )
    text_field: ShortString = Field("text", description="Field holding the text (shape text).")
    prompt_field: ShortString = Field(
        "prompt", description="Field holding the prompt (shape promptCompletion)."
    )
    completion_field: ShortString = Field(
        "completion", description="Field holding the completion (shape promptCompletion)."
    )
    messages_field: ShortString = Field("messages", description="Field holding the messages (shape chat).")
    role_field: ShortString = Field("role", description="A message's field naming its role (shape chat).")
    content_field: ShortString = Field("content", description="A message's text field (shape chat).")
    system_roles: RoleNames = Field(["system"], description="Role names read as system (shape chat).")
    user_roles: RoleNames = Field(
        ["user", "human"], description="Role names read as user (shape chat); other roles are malformed."
    )
    assistant_roles: RoleNames = Field(
        ["assistant", "gpt"], description="Role names read as assistant, the turns learned (shape chat)."
    )
    tool_call_roles: RoleNames = Field(
        ["function_call"],
        description="Role names whose content is a tool call ({name, arguments} as JSON), read as an "
        "assistant turn calling that tool (ShareGPT's function_call; shape chat).",
    )
    tool_roles: RoleNames = Field(
        ["tool", "observation", "ipython", "function"],
        description="Role names read as a tool's result, never learned (shape chat).",
    )
    tools_field: ShortString = Field(
        "tools",
        description="Field holding the tools offered (a list or its JSON text), passed to the chat "
        "template (shape chat).",
    )
    chosen_field: ShortString = Field(
        "chosen", description="The preferred answer: text, a message or messages (shape preference)."
    )
    rejected_field: ShortString = Field(
        "rejected", description="The dispreferred answer, in the same forms (shape preference)."
    )
    instruction_field: ShortString = Field("instruction", description="The instruction (shape alpaca).")
    input_field: ShortString = Field("input", description="The optional input (shape alpaca).")
    output_field: ShortString = Field("output", description="The answer learned (shape alpaca).")

    rules = (
        Rule(
            cel=" || ".join(["has(self.format)", *(f"self.uri.endsWith('{e}')" for e in DATASET_EXTENSIONS)]),
            message=f"format is required when the uri does not end in {DATASET_EXTENSIONS_TEXT}",
            field="format",
            check=lambda s: s.format is not None or s.uri.endswith(DATASET_EXTENSIONS),
        ),
    )


class ChatTemplateSpec(ApiModel):
    """Exactly one of: a template this project ships, inline Jinja, a file in the model's (or
    tokenizer's) folder, or a file in storage."""

    name: Literal["llama3", "llama3.1", "llama2", "mistral", "chatml"] | None = Field(
        None,
        description="llama3 (Llama 3 Instruct), llama3.1 (Llama 3.1/3.2/3.3 Instruct, tools), llama2 "
        "(Llama 2 Chat), mistral (Mistral 7B Instruct v0.1 / Mixtral: [INST] turns, a system prompt put "
        "before the first user turn), chatml (ChatML <|im_start|> turns).",
    )
    jinja: Annotated[str, Field(min_length=1, max_length=65536)] | None = Field(
        None, description="The template itself (Jinja, as a tokenizer_config.json chat_template)."
    )
    model_file: ShortString | None = Field(
        None, description="A file in the model's (or tokenizer's) folder, e.g. chat_template.jinja."
    )
    uri: StorageUri | None = Field(None, description="A template file in storage (s3:// or file://).")

    rules = (
        Rule(
            cel="(has(self.name) ? 1 : 0) + (has(self.jinja) ? 1 : 0) + (has(self.modelFile) ? 1 : 0) "
            "+ (has(self.uri) ? 1 : 0) == 1",
            message="set exactly one of name, jinja, modelFile and uri",
            field="name",
            check=lambda s: [s.name, s.jinja, s.model_file, s.uri].count(None) == 3,
        ),
    )


class DatasetSpec(ApiModel):
    """The training data: a weighted mixture of sources, cleaned, tokenized and split."""

    sources: list[DatasetSource] = Field(min_length=1, max_length=64, description="One or more sources.")
    max_seq_length: int = Field(2048, ge=16, le=131072, description="Tokens per training sequence.")
    packing: bool = Field(
        False,
        description="Pack whole records into sequences of maxSeqLength instead of padding each one; "
        "each record still attends only to itself and its positions restart.",
    )
    overlength: Literal["truncate", "drop", "split"] = Field(
        "truncate",
        description="What to do with records longer than maxSeqLength: keep the first window, drop "
        "them, or split them into windows (each token still predicted once).",
    )
    validation_fraction: float = Field(
        0.01, ge=0, lt=0.5, description="Share of records held out for evaluation (a deterministic split)."
    )
    dedupe: bool = Field(True, description="Remove exact duplicate records across all sources.")
    chat_template: ChatTemplateSpec | None = Field(
        None,
        description="The chat template chat records (and promptFormat chat) are rendered with. Left "
        "out: the tokenizer's own; a base model's tokenizer has none, so chat data then needs one "
        "here. Recorded in the exported tokenizer.",
    )
    reasoning: Literal["train", "drop"] = Field(
        "train",
        description="Assistant reasoning (a message's reasoning_content, a typed reasoning part, or "
        "<think>...</think> before the answer): trained as part of the answer, or dropped.",
    )
    max_dropped_fraction: float = Field(
        0.1,
        ge=0,
        le=1,
        description="A source whose read records are dropped as malformed, unencodable or without a "
        "target in a larger share than this stops the run (exit 2) with a report per reason, instead "
        "of training on the rest.",
    )
    shuffle: bool = Field(True, description="Shuffle records each epoch (seeded by training.seed).")


class LoraSpec(ApiModel):
    """Low-rank adapters (training.method lora)."""

    rank: int = Field(16, ge=1, le=1024, description="Adapter rank r.")
    alpha: float = Field(
        32.0, gt=0, le=4096, description="Scaling numerator (the update is scaled by alpha/r)."
    )
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[Annotated[str, Field(min_length=1, max_length=128)]] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1,
        max_length=64,
        description="Module names that get adapters (Llama's attention and MLP projections by default).",
    )
    export: Literal["merged", "adapter"] = Field(
        "merged", description="Final model: adapters merged into the base weights, or the adapter alone."
    )
    quantization: Literal["none", "nf4", "fp4"] = Field(
        "none",
        description="QLoRA: the frozen base held in 4 bits (bitsandbytes; nf4 for weights trained as "
        "Llama's are, fp4 the plain float format), with double quantisation and computed in the "
        "training precision; the adapters train as under LoRA. A merged export merges them into the "
        "base's own weights, loaded unquantised, so the result is a plain model. Needs ZeRO 0-2.",
    )


class DpoSpec(ApiModel):
    """Direct preference optimisation (training.objective dpo), with TRL's DPOConfig names."""

    beta: float = Field(
        0.1,
        gt=0,
        le=100,
        description="How far the policy may move from the reference: the implicit reward's scale "
        "(sigmoid) or the inverse of the target margin (ipo).",
    )
    loss_type: Literal["sigmoid", "ipo"] = Field(
        "sigmoid",
        description="sigmoid (the DPO paper's loss) or ipo (identity preference optimisation: a "
        "squared loss on length-averaged log-probabilities, less prone to overfitting the pairs).",
    )
    label_smoothing: float = Field(
        0.0,
        ge=0,
        lt=0.5,
        description="The share of pairs assumed mislabelled (conservative DPO); sigmoid only.",
    )

    rules = (
        Rule(
            cel="self.lossType == 'sigmoid' || self.labelSmoothing == 0.0",
            message="labelSmoothing applies to lossType sigmoid only; set it to 0 or use sigmoid",
            field="labelSmoothing",
            check=lambda s: s.loss_type == "sigmoid" or s.label_smoothing == 0,
        ),
    )


class DistillationSpec(ApiModel):
    """Knowledge distillation (training.objective distill): the student learns the teacher's
    next-token distribution next to the data's tokens. Names as TRL's GKDConfig where it has one."""

    teacher: ModelSource = Field(
        description="The teacher model, in the forms model.source takes. It must share the student's "
        "vocabulary (the same tokenizer family): the trainer refuses it at start otherwise."
    )
    teacher_revision: ShortString | None = Field(None, description="Hub revision of a hub-id teacher.")
    temperature: float = Field(
        1.0, gt=0, le=100, description="Both models' logits are divided by it before comparing."
    )
    beta: float = Field(
        0.0,
        ge=0,
        le=1,
        description="The divergence, as TRL's generalized JSD: 0 is forward KL(teacher || student), "
        "1 is reverse KL(student || teacher), values between interpolate (0.5: Jensen-Shannon).",
    )
    alpha: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Weight of the distillation loss; 1 - alpha weighs the cross-entropy on the data's "
        "tokens. Both are means over the target tokens of the global batch.",
    )


class TrainingSpec(ApiModel):
    """The optimisation: method, objective, length, batch, schedule and numerics."""

    method: Literal["full", "lora"] = Field("full", description="Full fine-tuning or LoRA adapters.")
    lora: LoraSpec | None = Field(None, description="LoRA settings; only with method lora (defaults apply).")
    objective: Literal["sft", "dpo", "distill"] = Field(
        "sft",
        description="What is learned, with either method: sft (next-token cross-entropy on the "
        "targets), dpo (preference pairs against the model as it was before training: needs "
        "preference data) or distill (a teacher's next-token distribution: needs distillation).",
    )
    dpo: DpoSpec | None = Field(None, description="DPO settings; only with objective dpo (defaults apply).")
    distillation: DistillationSpec | None = Field(
        None, description="The teacher and the loss's settings; required with objective distill, only then."
    )
    epochs: int | None = Field(
        None, ge=1, le=1000, description="Passes over the data. Set this or maxSteps; neither means 1 epoch."
    )
    max_steps: int | None = Field(
        None, ge=1, le=10_000_000, description="Optimizer steps to run. Set this or epochs, not both."
    )
    micro_batch_size: int = Field(
        1, ge=1, le=4096, description="Sequences per GPU (per process) per forward pass."
    )
    global_batch_size: int | None = Field(
        None,
        ge=1,
        le=1_048_576,
        description="Sequences per optimizer step across all ranks. Gradient accumulation is derived: "
        "globalBatchSize / (microBatchSize x world size), which must be a whole number. "
        "Left out: one micro batch per rank (no accumulation).",
    )
    learning_rate: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Peak learning rate. Left out: 2e-5 for full, 2e-4 for lora; with "
        "objective dpo 1e-6 for full and 1e-5 for lora.",
    )
    warmup_steps: int | None = Field(None, ge=0, description="Linear warmup steps. Set this or warmupRatio.")
    warmup_ratio: float | None = Field(
        None, ge=0, lt=1, description="Warmup as a share of all steps. Left out (with warmupSteps): 0.03."
    )
    lr_schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warmup.")
    weight_decay: float = Field(
        0.0, ge=0, le=1, description="AdamW weight decay (never on biases and norms)."
    )
    gradient_clipping: float = Field(1.0, ge=0, description="Max gradient norm; 0 turns clipping off.")
    precision: Literal["bf16", "fp16", "fp32"] = Field("bf16", description="Training numerics.")
    gradient_checkpointing: bool = Field(True, description="Recompute activations to save memory.")
    seed: int = Field(42, ge=0, le=2**31 - 1, description="Seed for initialisation, shuffling and the split.")
    eval_every_steps: int | None = Field(
        None, ge=1, description="Evaluate every N steps. Left out: at every checkpoint when data is held out."
    )
    log_every_steps: int = Field(10, ge=1, description="Report progress every N steps.")
    attention_implementation: Literal["sdpa", "flash_attention_2", "eager"] = Field(
        "sdpa",
        description="Attention kernel: PyTorch's scaled-dot-product attention, flash-attention 2 "
        "(needs the flash-attn package in the image and a CUDA GPU; packed micro batches go to its "
        "varlen kernel unpadded), or the plain eager implementation.",
    )
    liger_kernels: bool = Field(
        False,
        description="Patch the model with Liger's fused Triton kernels (RMSNorm, RoPE, SwiGLU, fused "
        "linear cross-entropy); needs the liger-kernel package in the image and a CUDA GPU.",
    )

    rules = (
        Rule(
            cel="self.attentionImplementation != 'flash_attention_2' || self.precision != 'fp32'",
            message="flash_attention_2 runs in bf16 or fp16 only; set precision bf16 or use sdpa",
            field="attentionImplementation",
            check=lambda s: s.attention_implementation != "flash_attention_2" or s.precision != "fp32",
        ),
        Rule(
            cel="self.method == 'lora' || !has(self.lora)",
            message="lora settings are only allowed with method lora",
            field="lora",
            check=lambda s: s.method == "lora" or s.lora is None,
        ),
        Rule(
            cel="self.objective == 'dpo' || !has(self.dpo)",
            message="dpo settings are only allowed with objective dpo",
            field="dpo",
            check=lambda s: s.objective == "dpo" or s.dpo is None,
        ),
        Rule(
            cel="(self.objective == 'distill') == has(self.distillation)",
            message="objective distill needs distillation (its teacher), and distillation is only "
            "allowed with objective distill",
            field="distillation",
            check=lambda s: (s.objective == "distill") == (s.distillation is not None),
        ),
        Rule(
            cel="!(has(self.epochs) && has(self.maxSteps))",
            message="set epochs or maxSteps, not both",
            field="maxSteps",
            check=lambda s: s.epochs is None or s.max_steps is None,
        ),
        Rule(
            cel="!(has(self.warmupSteps) && has(self.warmupRatio))",
            message="set warmupSteps or warmupRatio, not both",
            field="warmupRatio",
            check=lambda s: s.warmup_steps is None or s.warmup_ratio is None,
        ),
        Rule(
            cel="!has(self.globalBatchSize) || self.globalBatchSize >= self.microBatchSize",
            message="globalBatchSize must be at least microBatchSize",
            field="globalBatchSize",
            check=lambda s: s.global_batch_size is None or s.global_batch_size >= s.micro_batch_size,
        ),
    )


class ParallelismSpec(ApiModel):
    """Model parallelism inside a node, for what ZeRO's data parallelism alone cannot fit: a
    sequence's activations (sequence) or a layer's matrices (tensor). The rest of the world is data
    parallel: globalBatchSize counts sequences over the data-parallel groups only."""

    sequence: int = Field(
        1,
        ge=1,
        le=64,
        description="Ulysses sequence parallelism (DeepSpeed's Arctic Long Sequence Training): each "
        "sequence's tokens are split over this many processes of a node, which exchange attention "
        "heads by all-to-all; for contexts whose activations do not fit one GPU. The model's attention "
        "and key/value heads must divide by it; sdpa or flash_attention_2 only, and packing only with "
        "flash_attention_2.",
    )
    tensor: int = Field(
        1,
        ge=1,
        le=64,
        description="Tensor parallelism (DeepSpeed AutoTP): each layer's matrices are split over this "
        "many processes of a node, with an all-reduce per layer; for models whose weights and "
        "activations do not fit one GPU below ZeRO-3. ZeRO 0-2 only.",
    )

    rules = (
        Rule(
            cel="self.sequence == 1 || self.tensor == 1",
            message="set sequence or tensor above 1, not both",
            field="tensor",
            check=lambda s: s.sequence == 1 or s.tensor == 1,
        ),
    )

    @property
    def model_parallel_size(self) -> int:
        """Processes that share each sequence of a batch."""
        return self.sequence * self.tensor


class DeepSpeedSpec(ApiModel):
    """DeepSpeed engine settings; the trainer generates the full DeepSpeed config from the spec."""

    zero_stage: Literal[0, 1, 2, 3] = Field(
        2, description="ZeRO stage: 0 off, 1 optimizer states, 2 + gradients, 3 + parameters sharded."
    )
    offload_optimizer: bool = Field(False, description="Keep optimizer states in CPU memory (ZeRO 1-3).")
    offload_parameters: bool = Field(False, description="Keep parameters in CPU memory (ZeRO 3 only).")
    override: dict[str, Any] | None = Field(
        None, description="Raw DeepSpeed config merged last, over everything generated. Expert use."
    )

    rules = (
        Rule(
            cel="!self.offloadOptimizer || self.zeroStage >= 1",
            message="offloadOptimizer needs zeroStage 1, 2 or 3",
            field="offloadOptimizer",
            check=lambda s: not s.offload_optimizer or s.zero_stage >= 1,
        ),
        Rule(
            cel="!self.offloadParameters || self.zeroStage == 3",
            message="offloadParameters needs zeroStage 3",
            field="offloadParameters",
            check=lambda s: not s.offload_parameters or s.zero_stage == 3,
        ),
    )


def _reserved_env_cel() -> str:
    names = ", ".join(f"'{n}'" for n in sorted(contract.RESERVED_ENV))
    return f"self.env.all(e, !(e.name in [{names}]))"


class ResourcesSpec(ApiModel):
    """Where and how the rank pods run."""

    nodes: int = Field(1, ge=1, le=1024, description="Node ranks (one pod each).")
    gpus_per_node: int = Field(
        8, ge=0, le=64, description="GPUs per node rank; 0 runs on CPU (tests, demos)."
    )
    processes_per_node: int | None = Field(
        None,
        ge=1,
        le=256,
        description="Training processes per node rank. Left out: one per GPU, or 1 without GPUs.",
    )
    gpu_resource_name: ShortString = Field(
        "nvidia.com/gpu", description="Extended resource that counts GPUs on your nodes."
    )
    cpu: Quantity | None = Field(None, description="CPU request (and limit) per pod.")
    memory: Quantity | None = Field(None, description="Memory request (and limit) per pod.")
    shm_size: Quantity = Field(
        "16Gi", description="Size of /dev/shm (a memory-backed volume) for data loaders."
    )
    image: Annotated[str, Field(min_length=1, max_length=1024)] | None = Field(
        None, description="Trainer image. Left out: the operator's configured default trainer image."
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        "IfNotPresent", description="Pull policy for the trainer image."
    )
    image_pull_secrets: list[K8sName] = Field(
        default_factory=list, max_length=16, description="Secrets for pulling the trainer image."
    )
    node_selector: dict[str, Annotated[str, Field(max_length=253)]] = Field(
        default_factory=dict, description="Node labels every rank pod requires."
    )
    tolerations: list[Toleration] = Field(default_factory=list, max_length=64, description="Pod tolerations.")
    affinity: dict[str, Any] | None = Field(
        None, description="A Kubernetes Affinity, copied verbatim to every rank pod."
    )
    priority_class_name: K8sName | None = Field(None, description="PriorityClass of the rank pods.")
    scheduler_name: K8sName | None = Field(
        None, description="Scheduler of the rank pods (e.g. a gang scheduler)."
    )
    service_account_name: K8sName | None = Field(
        None, description="ServiceAccount of the rank pods; its token is not mounted."
    )
    env: list[EnvVar] = Field(default_factory=list, max_length=256, description="Extra trainer environment.")
    volumes: list[KubernetesVolume] = Field(
        default_factory=list,
        max_length=64,
        description="Kubernetes volumes for the rank pods (persistentVolumeClaim, nfs, csi, ephemeral, "
        "configMap, secret, hostPath...), mounted with volumeMounts.",
    )
    volume_mounts: list[KubernetesVolumeMount] = Field(
        default_factory=list,
        max_length=64,
        description="Where the trainer container mounts each volume (e.g. a dataset PVC at /data, "
        "read with file:///data/... uris).",
    )
    scratch: ScratchSpec = Field(
        default_factory=ScratchSpec,
        description=f"The node-local working volume at {contract.SCRATCH_DIR}: model cache, "
        "checkpoint staging.",
    )
    pod_metadata: PodMetadata = Field(
        default_factory=PodMetadata,
        description="Extra labels and annotations on every rank pod (service mesh, cost allocation, "
        "queueing); the operator's own labels always win and finetune.dev/ keys are refused.",
    )
    extended_resources: dict[str, Annotated[int, Field(ge=1, le=1024)]] = Field(
        default_factory=dict,
        max_length=32,
        description="More extended resources each rank pod requests and is limited to (RDMA devices "
        "such as rdma/ib or nvidia.com/hostdev), by resource name.",
    )
    host_network: bool = Field(
        False,
        description="Run the rank pods in their node's network namespace (for RDMA setups that need "
        "it). The ranks still meet through the job's Service DNS; each node then fits one rank pod "
        "of such jobs (the rendezvous port is a host port). See docs/operations.md before enabling.",
    )
    ipc_lock: bool = Field(
        False,
        description="Add the IPC_LOCK capability (pinning memory for RDMA) to the trainer container; "
        "see docs/operations.md.",
    )

    rules = (
        Rule(
            cel="!has(self.processesPerNode) || self.gpusPerNode == 0 "
            "|| self.processesPerNode == self.gpusPerNode",
            message="processesPerNode must equal gpusPerNode on GPU nodes (one process per GPU)",
            field="processesPerNode",
            check=lambda s: (
                s.processes_per_node is None
                or s.gpus_per_node == 0
                or s.processes_per_node == s.gpus_per_node
            ),
        ),
        Rule(
            cel=_reserved_env_cel(),
            message="env may not set variables the operator owns (rendezvous, job identity, storage "
            "credentials, the hub token: set model.tokenSecret instead)",
            field="env",
            check=lambda s: all(e.name not in contract.RESERVED_ENV for e in s.env),
        ),
        *volume_rules(),
        *EXTENDED_RESOURCE_RULES,
    )

    @property
    def procs_per_node(self) -> int:
        if self.processes_per_node is not None:
            return self.processes_per_node
        return self.gpus_per_node if self.gpus_per_node > 0 else 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node


# checkpoint.resume's two words besides a checkpoint's uri; the trainer reads the same names.
RESUME_LATEST: Final = "latest"
RESUME_NONE: Final = "none"


class CheckpointSpec(ApiModel):
    """Checkpoints in object storage: where, how often, how many kept, and where to resume from."""

    uri: StorageUri = Field(
        description="Store root (s3://bucket/prefix or file:///path); the job writes under "
        "<uri>/<namespace>/<job>/."
    )
    credentials_secret: K8sName | None = Field(
        None,
        description="Secret in the job's namespace with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
        "(optionally AWS_SESSION_TOKEN), used for every s3:// location of the job. Left out: the "
        "pod's own identity (e.g. workload identity).",
    )
    endpoint_url: Annotated[str, Field(pattern=r"^https?://[^\s/]+(/[^\s]*)?$", max_length=2048)] | None = (
        Field(None, description="S3-compatible endpoint (MinIO, Ceph, GCS interop). Left out: AWS.")
    )
    region: Annotated[str, Field(pattern=r"^[a-z0-9-]+$", max_length=64)] | None = Field(
        None, description="Storage region."
    )
    every_steps: int = Field(
        0, ge=0, description="Checkpoint every N optimizer steps; 0 turns this trigger off."
    )
    every_minutes: int = Field(
        30, ge=0, le=10080, description="Checkpoint every N minutes; 0 turns this off."
    )
    keep_last: int = Field(
        3, ge=1, le=1000, description="Committed checkpoints kept; older ones are deleted."
    )
    resume: Annotated[str, Field(max_length=2048)] = Field(
        RESUME_LATEST,
        pattern=rf"^({RESUME_LATEST}|{RESUME_NONE}|{ANY_STORAGE_URI})$",
        description=f"{RESUME_LATEST} (the newest committed checkpoint of this job), {RESUME_NONE} "
        "(start fresh), or the uri of one committed checkpoint.",
    )

    rules = (
        Rule(
            cel="self.everySteps > 0 || self.everyMinutes > 0",
            message="set everySteps or everyMinutes above 0, or the job never checkpoints",
            field="everySteps",
            check=lambda s: s.every_steps > 0 or s.every_minutes > 0,
        ),
    )


class OutputSpec(ApiModel):
    """Where the final model goes."""

    uri: StorageUri | None = Field(
        None,
        description="Destination of the final Hugging Face model. Left out: "
        "<checkpoint.uri>/<namespace>/<job>/final.",
    )


class RunPolicy(ApiModel):
    """Restarts, deadlines and clean-up."""

    max_restarts: int = Field(
        3,
        ge=0,
        le=1000,
        description="Gang restarts after application failures; infrastructure ones count toward "
        "maxInfrastructureRestarts instead.",
    )
    in_place_restarts: int = Field(
        3,
        ge=0,
        le=1000,
        description="Of those, how many an attempt may make in place: after an application failure "
        "(a collective timeout, a transient storage error, an unexpected exception) while every pod "
        "and node is healthy, the ranks' training processes restart inside the running pods and "
        "resume from the latest checkpoint with the model and data already on their scratch, "
        "instead of a new gang of pods. Each counts toward maxRestarts and backs off like one. 0 "
        "turns them off: every failure restarts the gang at pod level.",
    )
    max_infrastructure_restarts: int = Field(
        20,
        ge=0,
        le=10000,
        description="Gang restarts after evictions, preemptions and lost nodes before the job fails "
        "(InfrastructureRestartLimitExceeded): a job that fills its node's disk is not restarted for ever.",
    )
    backoff_base_seconds: int = Field(
        10,
        ge=1,
        le=3600,
        description="First restart delay; doubles with each restart of the same class "
        "(application or infrastructure: each class has its own count).",
    )
    backoff_cap_seconds: int = Field(300, ge=1, le=86400, description="Longest restart delay.")
    startup_timeout_seconds: int = Field(
        600,
        ge=30,
        le=86400,
        description="How long rank pods may stay unschedulable for a reason capacity does not fix (no "
        "node matches their selector, affinity or tolerations; a missing volume), pulling images, or "
        "scheduled but not started. A wait for capacity is not counted: see schedulingTimeoutSeconds.",
    )
    scheduling_timeout_seconds: int | None = Field(
        None,
        ge=30,
        description="How long a rank pod may wait for capacity (the scheduler reports Insufficient "
        "resources or is preempting for it) before the job fails (SchedulingTimeout). Left out: it waits "
        "as long as it takes, on every attempt. Pods that no node can ever take (no node matches the "
        "selector, affinity or tolerations; a missing volume) fail after startupTimeoutSeconds instead.",
    )
    active_deadline_seconds: int | None = Field(None, ge=1, description="Fail the job after this long.")
    progress_timeout_seconds: int | None = Field(
        1800, ge=60, description="Restart the gang when no training progress is reported for this long."
    )
    ttl_seconds_after_finished: int | None = Field(
        None, ge=0, description="Delete the job this long after it succeeded or failed."
    )
    clean_pod_policy: Literal["None", "Running", "All"] = Field(
        "Running", description="Pods deleted when the job finishes: none, those still running, or all."
    )
    termination_grace_period_seconds: int = Field(
        120, ge=10, le=3600, description="Time a rank has on SIGTERM to write its emergency checkpoint."
    )
    collective_timeout_seconds: int = Field(
        300,
        ge=1,
        le=86400,
        description="How long a rank waits in one collective of a training step (all-reduce, "
        "gather) before the run ends as transient (exit 75): a hung peer is noticed this soon.",
    )
    phase_timeout_seconds: int = Field(
        14400,
        ge=60,
        le=604800,
        description="How long ranks wait for another rank's long phase (model download, "
        "tokenization, checkpoint download, upload and commit, export) before giving up (exit 75).",
    )
    suspend: bool = Field(
        False, description="Stop the pods and keep the job; unsuspend resumes from a checkpoint."
    )
    adapt_micro_batch_on_out_of_memory: bool = Field(
        True,
        description="After an out-of-memory failure (trainer exit 4), restart with the micro batch "
        "halved (the largest proper divisor for odd sizes) and gradient accumulation raised to match, "
        "so the global batch, data order, loss and schedule stay the same; down to 1, then Failed "
        "(OutOfMemory). Such a restart does not count toward maxRestarts and has no backoff. false: "
        "an out-of-memory failure fails the job at once.",
    )

    rules = (
        Rule(
            cel="self.backoffCapSeconds >= self.backoffBaseSeconds",
            message="backoffCapSeconds must be at least backoffBaseSeconds",
            field="backoffCapSeconds",
            check=lambda s: s.backoff_cap_seconds >= s.backoff_base_seconds,
        ),
    )


class PlacementSpec(ApiModel):
    """Where the ranks go relative to each other."""

    topology_key: LabelKey | None = Field(
        None,
        description="A node label (e.g. a rack or network block label such as "
        "topology.kubernetes.io/zone or your fabric's block label) whose value all ranks of an "
        "attempt share, through pod affinity among the attempt's pods.",
    )
    topology_policy: Literal["Required", "Preferred"] = Field(
        "Required",
        description="Required: a rank waits (Pending, then Unschedulable past "
        "startupTimeoutSeconds) rather than leave the first rank's domain. Preferred: the scheduler "
        "keeps the ranks together when it can.",
    )
