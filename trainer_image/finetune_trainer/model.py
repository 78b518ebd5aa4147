"""The base model and tokenizer: fetched once per node, loaded for full fine-tuning or LoRA.

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
            {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if type(m).__name__ == "Linear"}
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


def load_base(config: TrainerConfig, source: str) -> Any:
    from transformers import AutoModelForCausalLM

    check_kernels(config)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source,
            revision=config.model.revision,
            trust_remote_code=config.model.trust_remote_code,
            dtype=torch_dtype(config.training.precision),
            attn_implementation=config.training.attention_implementation,
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
    model = load_base(config, source)
    if config.training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if config.training.method == "lora":
        model = with_adapters(model, config)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info("LoRA: %d trainable parameters", trainable)
    return model, keep_alive


def unlink_deepspeed() -> None:
    """End the HF/DeepSpeed link load_model made: from here on transformers loads a model on the one
    rank that asks (no `deepspeed.zero.Init`, whose partitioning is a collective of all ranks)."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
