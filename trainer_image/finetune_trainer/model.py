"""The base model and tokenizer: fetched once per node, loaded for full fine-tuning, LoRA or QLoRA
(LoRA on a base held in 4 bits by bitsandbytes, `training.lora.quantization`).

An `s3://` model is downloaded by each node's local rank 0 into the node's scratch cache (marked
complete only after the last file), while every other rank waits for the nodes' outcomes on the
rendezvous store (coordination.py); `file://` is read
in place; a hub id is left to transformers, which the cluster must be able to reach.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from finetune_operator.api import TrainerConfig
from finetune_operator.api.spec import LoraSpec

from finetune_trainer.coordination import Coordinator
from finetune_trainer.failures import InputMissing, InvalidInput
from finetune_trainer.storage import ObjectNotFound, Opener, is_storage_uri, local_path, open_store

log = logging.getLogger(__name__)

COMPLETE_MARKER = ".complete"


class ModelNotFound(InputMissing):
    """The model or tokenizer is missing or unreadable: the trainer exits 3 (InputNotFound)."""


def _fetched(dest: Path) -> bool:
    """The node's copy is whole: the marker (written after the last file) lists every file with its
    size, and every file is there at that size. A restart in place loads this copy, not the store's."""
    try:
        sizes: dict[str, int] = json.loads((dest / COMPLETE_MARKER).read_text())
        return all((dest / key).stat().st_size == size for key, size in sizes.items())
    except (OSError, ValueError, AttributeError):
        return False


def _fetch(uri: str, dest: Path, open_store: Opener) -> None:
    if _fetched(dest):
        log.info("model %s: using this node's copy", uri)
        return
    store = open_store(uri)
    objects = store.list("")
    if not any(o.key == "config.json" or o.key == "tokenizer_config.json" for o in objects):
        raise ModelNotFound(f"model {uri}: no config.json or tokenizer_config.json there")
    for obj in objects:
        try:
            store.get_file(obj.key, dest / obj.key)
        except ObjectNotFound:
            raise ModelNotFound(f"model {uri}: {obj.key} vanished while downloading") from None
    (dest / COMPLETE_MARKER).write_text(json.dumps({o.key: o.size for o in objects}))


def local_source(uri: str, cache: Path, phases: Coordinator, open_store: Opener = open_store) -> str:
    """A path (or hub id) transformers can load from; the node's download happens here once, while
    the node's other ranks wait on the rendezvous store (a download outlasts any collective timeout)."""
    path = local_path(uri)
    if path is not None:
        if not path.is_dir():
            raise ModelNotFound(f"model {uri}: no such directory")
        return str(path)
    if is_storage_uri(uri):
        dest = cache / hashlib.sha256(uri.encode()).hexdigest()[:16]
        # Every rank learns of a failed download instead of waiting for files that never come.
        phases.per_node(f"the download of {uri}", lambda: _fetch(uri, dest, open_store))
        return str(dest)
    return uri


class TokenizerUnusable(InvalidInput):
    """The tokenizer loads but cannot make examples (no end-of-sequence token): exit 2."""


def load_tokenizer(config: TrainerConfig, source: str, open_store: Opener = open_store) -> Any:
    """The tokenizer as transformers loads it: tokenizer.json, a SentencePiece `tokenizer.model`
    alone (Llama 2) or a tiktoken-format one (Llama 3), with `dataset.chatTemplate` applied."""
    from transformers import AutoTokenizer

    from finetune_trainer.chat_templates import choose

    field = "model.tokenizer" if config.model.tokenizer else "model.source"
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, revision=config.model.revision, trust_remote_code=config.model.trust_remote_code
        )
    except OSError as exc:
        raise ModelNotFound(f"{field}: tokenizer {source}: {exc}".splitlines()[0]) from None
    except Exception as exc:  # a converter's or a missing package's error, in transformers' words
        raise ModelNotFound(
            f"{field}: the tokenizer in {source} cannot be loaded ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); give a folder with tokenizer.json "
            "and tokenizer_config.json (save_pretrained writes both)"
        ) from None
    if tokenizer.eos_token is None:
        raise TokenizerUnusable(
            f"{field}: the tokenizer in {source} names no end-of-sequence token; add tokenizer_config.json "
            'with "eos_token" (and "bos_token") beside its tokenizer files'
        )
    choose(config, tokenizer, source, open_store)
    if tokenizer.pad_token is None:
        # Llama tokenizers ship without a pad token; padding is masked out of attention and loss,
        # so reusing end-of-sequence is safe and adds no embedding row.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def torch_dtype(precision: str) -> Any:
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def lora_config(config: TrainerConfig) -> Any:
    from peft import LoraConfig

    lora = config.training.lora or LoraSpec()
    return LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )


# What peft can adapt and the refusal lists: plain linear layers, and a 4-bit base's (QLoRA).
LINEAR = ("Linear", "Linear4bit")


class TargetModulesMissing(InvalidInput):
    """training.lora.targetModules names no module of the model: exit 2, the fix is the list."""


def with_adapters(model: Any, config: TrainerConfig) -> Any:
    """The model with LoRA adapters; targetModules that match nothing are refused with the names the
    model has (peft's NoMatchingPeftModuleError, which every restart would repeat)."""
    from peft import NoMatchingPeftModuleError, get_peft_model

    try:
        return get_peft_model(model, lora_config(config))
    except NoMatchingPeftModuleError:
        linear = sorted(
            {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if type(m).__name__ in LINEAR}
        )
        wanted = list((config.training.lora or LoraSpec()).target_modules)
        raise TargetModulesMissing(
            f"training.lora.targetModules: {wanted} match no module of the model; "
            f"its linear layers are {linear}"
        ) from None


class KernelMissing(InvalidInput):
    """A requested kernel is not in the image: an invalid configuration for this image (exit 2)."""


def check_kernels(config: TrainerConfig) -> None:
    """Refuse, naming the field, a kernel this image or machine cannot run, before any weight loads."""
    import importlib.util

    import torch
    from transformers.utils import is_liger_kernel_available

    training = config.training
    if training.attention_implementation == "flash_attention_2":
        from transformers.utils import is_flash_attn_2_available

        if not is_flash_attn_2_available():
            raise KernelMissing(
                "training.attentionImplementation: flash_attention_2 needs the flash-attn package and a "
                "CUDA GPU, and this image or machine has not both; use sdpa (the default), or build an "
                "image with flash-attn for its torch and CUDA"
            )
    if training.liger_kernels:
        if importlib.util.find_spec("liger_kernel") is None or not is_liger_kernel_available():
            raise KernelMissing(
                "training.ligerKernels: the liger-kernel package is not in this image; set it to false or "
                "build an image with `pip install liger-kernel`"
            )
        if not torch.cuda.is_available():
            raise KernelMissing(
                "training.ligerKernels: Liger's kernels are Triton GPU kernels; set it to false on CPU"
            )


def quantization(config: TrainerConfig) -> str:
    """none, nf4 or fp4: how the base is held while it trains (4-bit only under LoRA)."""
    lora = config.training.lora
    return lora.quantization if config.training.method == "lora" and lora is not None else "none"


def quantization_config(config: TrainerConfig) -> Any:
    """transformers' BitsAndBytesConfig for a QLoRA run (None when the base loads unquantised).

    Double quantisation (the block scales quantised again) as in the QLoRA paper; the compute dtype is
    the training precision's (bf16 on GPUs for bf16 runs, fp16 for fp16, fp32 for fp32 runs, the CPU
    tests'): bitsandbytes dequantises a block of the weight to it and multiplies in it, then casts
    the output back to the input's dtype, and DeepSpeed feeds every layer inputs in the training
    precision, so any other choice only adds two casts per layer (and under fp32 compute in a bf16
    run, a dequantised weight twice the size) without changing what the adapters learn from."""
    kind = quantization(config)
    if kind == "none":
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=kind,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch_dtype(config.training.precision),
    )


def _this_device() -> Any:
    """Where this rank's 4-bit base is quantised and kept: its own GPU (process_group.init set the
    current device), or the CPU. bitsandbytes quantises as the weights reach the device, so a 4-bit
    model is placed while it loads instead of by DeepSpeed afterwards."""
    from deepspeed.accelerator import get_accelerator

    from finetune_trainer.process_group import on_cpu

    return "cpu" if on_cpu() else get_accelerator().current_device_name()


def load_base(config: TrainerConfig, source: str, *, quantized: Any = None) -> Any:
    """The base in the training dtype; with `quantized` (a BitsAndBytesConfig), its linear layers in
    4 bits on this rank's device. Without it (the merged export's fresh copy), always unquantised."""
    from transformers import AutoModelForCausalLM

    check_kernels(config)
    if quantized is not None:
        # On a CPU, importing bitsandbytes warns that it cannot fetch an optional inference kernel
        # (the `kernels` package, from the hub); training never runs it (keep_training_layout).
        logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    placement = (
        {} if quantized is None else {"quantization_config": quantized, "device_map": {"": _this_device()}}
    )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source,
            revision=config.model.revision,
            trust_remote_code=config.model.trust_remote_code,
            dtype=torch_dtype(config.training.precision),
            attn_implementation=config.training.attention_implementation,
            **placement,
        )
    except OSError as exc:
        raise ModelNotFound(f"model {source}: {exc}".splitlines()[0]) from None
    if config.training.liger_kernels:
        from transformers.integrations.liger import apply_liger_kernel

        # transformers' own integration (what its Trainer's use_liger_kernel calls). Liger's fused
        # linear cross-entropy sums and divides by `num_items_in_batch` like transformers' loss
        # (linkedin/Liger-Kernel, transformers/model/loss_utils.py), so token_loss.py holds with it.
        apply_liger_kernel(model, None)
    return model


def load_model(config: TrainerConfig, source: str, ds_config: dict[str, Any]) -> tuple[Any, Any]:
    """The model to train, and the object that must outlive it under ZeRO-3 (the HF/DeepSpeed link
    that makes from_pretrained partition weights while loading instead of on one rank)."""
    import torch

    keep_alive = None
    if config.deepspeed.zero_stage == 3:
        from transformers.integrations import HfDeepSpeedConfig

        keep_alive = HfDeepSpeedConfig(ds_config)
    torch.manual_seed(config.training.seed)
    quantized = quantization_config(config)
    model = load_base(config, source, quantized=quantized)
    checkpointing = config.training.gradient_checkpointing
    if quantized is not None:
        model = prepare_4bit_base(model, gradient_checkpointing=checkpointing)
    elif checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if checkpointing:
        model.config.use_cache = False
    if config.training.method == "lora":
        model = with_adapters(model, config)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info("LoRA: %d trainable parameters", trainable)
    return model, keep_alive


def prepare_4bit_base(model: Any, *, gradient_checkpointing: bool) -> Any:
    """peft's preparation of a k-bit base for training, with the job's own checkpointing setting.

    `prepare_model_for_kbit_training` freezes every base parameter and upcasts the unquantised ones
    (norms, embeddings, output layer) to fp32; under bf16/fp16 DeepSpeed casts them back when the
    engine is built (it casts floating parameters only: the 4-bit weights are uint8 storage and stay
    as they are), so the upcast is transient. It would turn gradient checkpointing on by default;
    here it is on only when training.gradientCheckpointing asks, and non-reentrant as for every other
    model (which needs no input-gradient hook: the frozen embeddings' output requires no gradient)."""
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    layers = [m for m in model.modules() if _is_4bit(m)]
    for layer in layers:
        keep_training_layout(layer)
        # The 4-bit weight and its quantisation state are rebuilt from the model source at every
        # start (rebuilt_at_load), so no state dict (a checkpoint's) carries them.
        layer.register_state_dict_post_hook(_without_weight)
    log.info("QLoRA: %d linear layers of the base in 4 bits, frozen", len(layers))
    return model


def _is_4bit(module: Any) -> bool:
    import bitsandbytes as bnb

    return isinstance(module, bnb.nn.Linear4bit)


def _without_weight(module: Any, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    for key in [k for k in state_dict if k == f"{prefix}weight" or k.startswith(f"{prefix}weight.")]:
        del state_dict[key]


def rebuilt_at_load(module: Any) -> bool:
    """Whether the run re-creates its frozen base from the model source at every start instead of
    restoring it from a checkpoint: a 4-bit base (QLoRA) is quantised afresh, deterministically, from
    the same weights, so its checkpoints hold only what trains (the adapters and their optimizer
    state): no frozen weights, no quantisation state, and no second copy in DeepSpeed's frozen
    fragments. A 70B base would otherwise be snapshotted to host memory and uploaded, twice, at
    every checkpoint for nothing."""
    return bool(getattr(module, "is_loaded_in_4bit", False))


def load_trained(src: dict[str, Any], dst: Any) -> None:
    """DeepSpeed's `custom_load_fn` for a run whose base is rebuilt at load: every trained parameter
    from the checkpoint (a missing one is an error, as a strict load's), the rest left as loaded
    from the model source. Whatever else the checkpoint holds (an older one's base) is ignored."""
    import torch

    trained = {name: p for name, p in dst.named_parameters() if p.requires_grad}
    missing = sorted(set(trained) - set(src))
    if missing:
        raise RuntimeError(
            f"the checkpoint lacks {len(missing)} trained parameters of this model, e.g. {missing[:3]}"
        )
    with torch.no_grad():
        for name, param in trained.items():
            param.copy_(src[name])


def keep_training_layout(layer: Any) -> None:
    """Keep a 4-bit layer's weight in the layout it trains in.

    On a CPU with AVX512-BF16, bitsandbytes (0.50) repacks a Linear4bit's weight for its inference
    kernel the first time the layer runs in eval mode without gradients (our evaluation), and from
    then on multiplies with that kernel in training too: it has no backward, so gradients stop
    flowing through the base layers to the adapters below them (torch warns "silently incorrect"),
    the forward runs in bf16 whatever the compute dtype, the parameter changes shape under DeepSpeed,
    and a checkpoint's state dict converts it back lossily. GPUs never take that path."""
    layer.support_avx512bf16_for_cpu = False


def unlink_deepspeed() -> None:
    """End the HF/DeepSpeed link load_model made: from here on transformers loads a model on the one
    rank that asks (no `deepspeed.zero.Init`, whose partitioning is a collective of all ranks)."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
