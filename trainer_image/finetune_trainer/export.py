"""The final model in Hugging Face format (safetensors, config, tokenizer) at the output uri.

Every collective of the export happens first, on every rank: under ZeRO-3 a full run consolidates
the 16-bit weights from the shards, a LoRA run gathers only its trained adapter weights (megabytes,
not the base's gigabytes; peft's own advice: GatheredParameters around the save). Then the
HF/DeepSpeed link is dropped, so nothing rank 0 does alone can enter a collective: with the link
alive, transformers' `from_pretrained` would open `deepspeed.zero.Init` and broadcast every
parameter in a collective only rank 0 joins (the LoRA-on-ZeRO-3 hang). Rank 0 writes while the
other ranks wait on the rendezvous store. A LoRA run exports either the adapter alone or the adapter
merged into a fresh CPU copy of the base.

QLoRA (a base trained in 4 bits) exports the same two ways, and neither holds a 4-bit weight. The
adapter is saved as any LoRA adapter: it loads with peft on the unquantised base (or on a 4-bit one,
for inference as it trained). The merged model is the adapter merged into the base's own weights,
loaded unquantised in the training dtype, never into the 4-bit weights the run trained against:
merging there means dequantising, adding the update and quantising again, a second rounding that
loses part of the update (all of it wherever it is under half a 4-bit step); and a 4-bit model is
not the plain model a merged export promises. The merged weights differ from what the run computed by
the base's own quantisation error (W + BA where it trained on dequant(Q(W)) + BA), as in every
QLoRA merge into the 16-bit base; a run that must serve exactly what it trained exports the adapter
and serves it on the 4-bit base. The output uri is a directory committed by its manifest
(committed_dir.py): the upload ends with the export's own MANIFEST.json, so a reader never takes a
half-uploaded model for a finished one, and a restart after a finished export does not redo it.
"""

from __future__ import annotations

import json
import logging
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from finetune_operator.api import TrainerConfig
from finetune_operator.api.spec import LoraSpec
from pydantic import BaseModel

from finetune_trainer import process_group, tensor_parallel
from finetune_trainer.committed_dir import CommittedDir, FileEntry
from finetune_trainer.coordination import Coordinator
from finetune_trainer.model import load_base, lora_config, unlink_deepspeed
from finetune_trainer.storage import ObjectNotFound, ObjectStore

log = logging.getLogger(__name__)


class ExportManifest(BaseModel):
    step: int
    kind: str  # full | merged | adapter
    files: list[FileEntry]
    created_at: datetime


def exported_step(store: ObjectStore) -> int | None:
    try:
        return ExportManifest.model_validate_json(CommittedDir(store, "").manifest()).step
    except (ObjectNotFound, ValueError):
        return None


def export_kind(config: TrainerConfig) -> str:
    if config.training.method != "lora":
        return "full"
    return (config.training.lora or LoraSpec()).export


def full_state_dict(engine: Any, zero_stage: int) -> dict[str, Any] | None:
    """The whole model's weights on rank 0 (None elsewhere); every rank must call it under ZeRO-3
    and under tensor parallelism (each group gathers its shards)."""
    if tensor_parallel.degree_of(engine) > 1:
        return tensor_parallel.gathered_state_dict(engine)
    if zero_stage == 3:
        state: dict[str, Any] | None = engine._zero3_consolidated_16bit_state_dict()
        return state
    return engine.module.state_dict() if process_group.from_env().is_main else None


def trained_state_dict(engine: Any) -> dict[str, Any] | None:
    """The trained parameters (LoRA's adapters) in full, as CPU copies on rank 0 (None elsewhere).
    Every rank must call it: under ZeRO-3 the gather is a collective; below it, a no-op."""
    import deepspeed

    named = [(name, p) for name, p in engine.module.named_parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
        if not process_group.from_env().is_main:
            return None
        return {name: p.detach().to("cpu", copy=True) for name, p in named}


def _write(config: TrainerConfig, engine: Any, state: dict[str, Any], base_source: str, tokenizer: Any,
           out: Path) -> None:  # fmt: skip
    kind = export_kind(config)
    if kind in ("full", "adapter"):
        # Both save from the gathered state, never from the (sharded) module's own tensors; for an
        # adapter, peft keeps only the adapter's entries of it.
        engine.module.save_pretrained(out, state_dict=state, safe_serialization=True)
    else:
        from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

        # A fresh CPU copy of the base (a plain load: the DeepSpeed link is gone), the adapter on it.
        # Under QLoRA too: load_base without a quantisation config loads the base's own weights
        # unquantised in the training dtype (the module docstring says why never the 4-bit ones).
        fresh = get_peft_model(load_base(config, base_source), lora_config(config))
        set_peft_model_state_dict(fresh, get_peft_model_state_dict(fresh, state_dict=state))
        fresh.merge_and_unload().save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def export(config: TrainerConfig, engine: Any, *, step: int, base_source: str, tokenizer: Any,
           store: ObjectStore, scratch: Path, phases: Coordinator) -> None:  # fmt: skip
    if export_kind(config) == "full":
        state = full_state_dict(engine, config.deepspeed.zero_stage)
    else:
        state = trained_state_dict(engine)
    unlink_deepspeed()  # every collective is behind us: what follows is rank 0's alone

    def write_and_upload() -> None:
        assert state is not None
        output = CommittedDir(store, "")  # the output uri itself, not a folder inside it
        output.uncommit()  # from here on, until the new manifest, the output is unfinished
        out = scratch / "export"
        shutil.rmtree(out, ignore_errors=True)
        _write(config, engine, state, base_source, tokenizer, out)
        entries = output.upload(out)
        manifest = ExportManifest(
            step=step, kind=export_kind(config), files=entries, created_at=datetime.now(UTC)
        )
        output.commit(manifest.model_dump_json(indent=1))
        log.info(
            "exported %s model of step %d: %s", manifest.kind, step, json.dumps([e.path for e in entries])
        )

    # Rank 0 writes and uploads; the others wait on the rendezvous store, not in a collective.
    phases.on_main("the export", write_and_upload)
