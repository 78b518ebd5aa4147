"""The FineTuneJob API: pydantic models that generate the CRD, the docs and the trainer config."""

from finetune_operator.api.errors import describe
from finetune_operator.api.job import API_VERSION, FineTuneJob, FineTuneJobSpec, ObjectMeta, parse_manifest
from finetune_operator.api.status import ACTIVE_PHASES, TERMINAL_PHASES, FineTuneJobStatus, Phase
from finetune_operator.api.trainer_config import TrainerConfig, resolve_trainer_config

__all__ = [
    "ACTIVE_PHASES",
    "API_VERSION",
    "TERMINAL_PHASES",
    "FineTuneJob",
    "FineTuneJobSpec",
    "FineTuneJobStatus",
    "ObjectMeta",
    "Phase",
    "TrainerConfig",
    "describe",
    "parse_manifest",
    "resolve_trainer_config",
]
