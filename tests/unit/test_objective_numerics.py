"""The loss math of preference training (preference_loss) and distillation (distill_loss) is TRL's.

TRL is the oracle (a dev dependency only, never in the trainer image): every expected value here comes
from TRL's own code, never from the formula written out again.

- DPO: on a tiny random Llama, for the same batch (laid out by TRL's own collator, prompts masked) and the
  same fixed reference log-probs, our loss, rewards and parameter gradients are those of
  `DPOTrainer._compute_loss` (trl/trainer/dpo_trainer.py), and `sequence_logps` gives the per-sequence
  log-probs of `DPOTrainer.compute_ref_log_probs`.
- Distillation: our summed divergence over the target count is `GKDTrainer.generalized_jsd_loss`
  (trl/experimental/gkd) with reduction "batchmean", and the chunked loss of TRL's `DistillationTrainer`
  (trl/trainer/distillation_trainer.py, `_chunked_divergence_loss`).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset
from finetune_trainer.chat_labels import IGNORE_INDEX
from finetune_trainer.distill_loss import token_divergence
from finetune_trainer.preference_loss import DpoTerms, dpo_terms, sequence_logps
from finetune_trainer.tiny import tiny_tokenizer
from torch.distributions import Categorical, kl_divergence
from transformers import LlamaConfig, LlamaForCausalLM
from trl import DPOConfig, DPOTrainer
from trl.import_utils import TRLExperimentalWarning
from trl.trainer.distillation_trainer import _chunked_divergence_loss

with warnings.catch_warnings():
    # GKD lives in trl.experimental in TRL 1.x, which warns on import that its API may change.
    warnings.simplefilter("ignore", TRLExperimentalWarning)
    from trl.experimental.gkd import GKDTrainer

# TRL 1.16 still passes transformers 5.24 settings under their old names; the warnings are TRL's to fix.
pytestmark = [
    pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

TOLERANCE: dict[str, float] = {"atol": 1e-5, "rtol": 1e-5}
VOCAB = 64

# Two pairs whose completions differ in length both ways, so padding, per-row counts and IPO's length
# normalisation all matter. Ids are below the tiny tokenizer's vocabulary; 3 is its EOS.
PAIRS = [
    {"prompt_ids": [2, 9, 10], "chosen_ids": [11, 12, 3], "rejected_ids": [13, 14, 15, 16, 3]},
    {"prompt_ids": [2, 9], "chosen_ids": [17, 19, 20, 21, 3], "rejected_ids": [18, 3]},
]
REFERENCE_CHOSEN = torch.tensor([-12.25, -21.5])
REFERENCE_REJECTED = torch.tensor([-20.75, -8.0])


@dataclass(frozen=True)
class Objective:
    """A loss as `dpo_terms` takes it, and the DPOConfig fields with which TRL computes the same loss."""

    ours: dict[str, Any]
    trl: dict[str, Any]
    # TRL 1.x applies no label smoothing to "sigmoid"; conservative DPO is its "aot" loss over a single pair
    # ("aot" sorts the log-ratios across the batch, which for one pair leaves them as they are).
    one_pair_at_a_time: bool = False


OBJECTIVES = {
    "sigmoid": Objective({"loss_type": "sigmoid", "beta": 0.1}, {"loss_type": "sigmoid", "beta": 0.1}),
    "ipo": Objective({"loss_type": "ipo", "beta": 0.5}, {"loss_type": "ipo", "beta": 0.5}),
    "sigmoid-label-smoothing": Objective(
        {"loss_type": "sigmoid", "beta": 0.1, "label_smoothing": 0.1},
        {"loss_type": "aot", "beta": 0.1, "label_smoothing": 0.1},
        one_pair_at_a_time=True,
    ),
}


# --- DPO ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return tiny_tokenizer([" ".join(f"w{i}" for i in range(32))])


@pytest.fixture
def models() -> tuple[LlamaForCausalLM, LlamaForCausalLM]:
    """Two copies of one seeded tiny Llama: TRL patches the forward of the one its trainer gets."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        pad_token_id=1,
    )
    model = LlamaForCausalLM(config).train()
    return model, copy.deepcopy(model)


def _trl_dpo(tmp_path: Path, tokenizer: Any, model: LlamaForCausalLM, **config: Any) -> DPOTrainer:
    """A real DPOTrainer on the tiny model, its reference log-probs read from the batch (precomputed mode),
    in float32 (TRL defaults to bf16 autocast)."""
    args = DPOConfig(
        output_dir=str(tmp_path),
        report_to="none",
        use_cpu=True,
        bf16=False,
        precompute_ref_log_probs=True,
        save_strategy="no",
        logging_strategy="no",
        **config,
    )
    # The trainer wants a dataset to prepare; the batches under test are handed to it directly.
    placeholder = Dataset.from_list([{"prompt": "w1 w2", "chosen": " w3", "rejected": " w4"}])
    return DPOTrainer(model=model, args=args, train_dataset=placeholder, processing_class=tokenizer)


def _trl_loss(trainer: DPOTrainer, pairs: list[dict[str, list[int]]], rows: slice) -> torch.Tensor:
    batch = trainer.data_collator(pairs)
    batch["ref_chosen_logps"] = REFERENCE_CHOSEN[rows]
    batch["ref_rejected_logps"] = REFERENCE_REJECTED[rows]
    return trainer._compute_loss(trainer.model, batch, return_outputs=False)


def _trl_mean_loss(trainer: DPOTrainer, objective: Objective) -> torch.Tensor:
    if not objective.one_pair_at_a_time:
        return _trl_loss(trainer, PAIRS, slice(None))
    return torch.stack([_trl_loss(trainer, [pair], slice(i, i + 1)) for i, pair in enumerate(PAIRS)]).mean()


def _batch(trainer: DPOTrainer) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The pairs as TRL lays them out (all chosen rows, then all rejected), and their labels."""
    batch = trainer.data_collator(PAIRS)
    return batch, batch["input_ids"].masked_fill(batch["completion_mask"] == 0, IGNORE_INDEX)


def _our_terms(model: LlamaForCausalLM, trainer: DPOTrainer, **objective: Any) -> DpoTerms:
    batch, labels = _batch(trainer)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps, tokens = sequence_logps(logits, labels)
    policy_chosen, policy_rejected = logps.chunk(2)
    chosen_tokens, rejected_tokens = tokens.chunk(2)
    return dpo_terms(
        policy_chosen,
        policy_rejected,
        REFERENCE_CHOSEN,
        REFERENCE_REJECTED,
        chosen_tokens=chosen_tokens,
        rejected_tokens=rejected_tokens,
        **objective,
    )


@pytest.mark.parametrize("name", OBJECTIVES)
def test_dpo_loss_equals_trls(name: str, models: Any, tokenizer: Any, tmp_path: Path) -> None:
    theirs, ours = models
    objective = OBJECTIVES[name]
    trainer = _trl_dpo(tmp_path, tokenizer, theirs, **objective.trl)

    expected = _trl_mean_loss(trainer, objective)
    actual = _our_terms(ours, trainer, **objective.ours).losses.mean()

    torch.testing.assert_close(actual, expected, **TOLERANCE)


@pytest.mark.parametrize("name", OBJECTIVES)
def test_dpo_gradients_equal_trls(name: str, models: Any, tokenizer: Any, tmp_path: Path) -> None:
    theirs, ours = models
    objective = OBJECTIVES[name]
    trainer = _trl_dpo(tmp_path, tokenizer, theirs, **objective.trl)

    _trl_mean_loss(trainer, objective).backward()
    _our_terms(ours, trainer, **objective.ours).losses.mean().backward()

    expected = dict(theirs.named_parameters())
    for parameter_name, parameter in ours.named_parameters():
        assert parameter.grad is not None, parameter_name
        torch.testing.assert_close(parameter.grad, expected[parameter_name].grad, **TOLERANCE)


def test_dpo_rewards_equal_trls(models: Any, tokenizer: Any, tmp_path: Path) -> None:
    """TRL reports the batch mean of each reward: one pair at a time, that is the pair's own reward."""
    theirs, ours = models
    trainer = _trl_dpo(tmp_path, tokenizer, theirs, loss_type="sigmoid", beta=0.1)
    for i, pair in enumerate(PAIRS):
        _trl_loss(trainer, [pair], slice(i, i + 1))
    metrics = trainer._metrics["train"]

    terms = _our_terms(ours, trainer, loss_type="sigmoid", beta=0.1)

    torch.testing.assert_close(terms.chosen_rewards, torch.tensor(metrics["rewards/chosen"]), **TOLERANCE)
    torch.testing.assert_close(terms.rejected_rewards, torch.tensor(metrics["rewards/rejected"]), **TOLERANCE)
    assert not terms.chosen_rewards.requires_grad and not terms.rejected_rewards.requires_grad


def test_sequence_logps_equal_trls_per_sequence_log_probs(
    models: Any, tokenizer: Any, tmp_path: Path
) -> None:
    theirs, ours = models
    trainer = _trl_dpo(tmp_path, tokenizer, theirs, loss_type="sigmoid")
    batch, labels = _batch(trainer)
    expected_chosen, expected_rejected = trainer.compute_ref_log_probs(trainer.model, batch)

    logits = ours(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps, tokens = sequence_logps(logits, labels)

    torch.testing.assert_close(logps, torch.cat([expected_chosen, expected_rejected]), **TOLERANCE)
    assert tokens.tolist() == batch["completion_mask"][:, 1:].sum(dim=1).tolist() == [3, 5, 5, 2]


def test_trls_sigmoid_loss_ignores_label_smoothing_so_cdpo_is_checked_against_its_aot_loss(
    models: Any, tokenizer: Any, tmp_path: Path
) -> None:
    """Why the label-smoothing oracle is "aot": should a TRL upgrade smooth its sigmoid loss again, this
    fails and the oracle can go back to "sigmoid"."""
    theirs, _ = models
    smoothed = _trl_dpo(tmp_path / "smoothed", tokenizer, theirs, loss_type="sigmoid", label_smoothing=0.1)
    plain = _trl_dpo(tmp_path / "plain", tokenizer, copy.deepcopy(theirs), loss_type="sigmoid")
    with torch.no_grad():
        torch.testing.assert_close(
            _trl_loss(smoothed, PAIRS, slice(None)), _trl_loss(plain, PAIRS, slice(None)), atol=0, rtol=0
        )


def test_ipo_without_token_counts_is_refused() -> None:
    logps = torch.tensor([-3.0])
    with pytest.raises(ValueError, match="chosen_tokens and rejected_tokens"):
        dpo_terms(logps, logps, logps, logps, beta=0.1, loss_type="ipo")


# --- distillation -----------------------------------------------------------------------------------------


def _logits_and_labels(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student and teacher logits over 3 rows of 9 positions, with a masked prompt, padding and a row's
    middle masked (a multi-turn label pattern)."""
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(3, 9, VOCAB, generator=generator)
    teacher = 2 * torch.randn(3, 9, VOCAB, generator=generator)
    labels = torch.randint(0, VOCAB, (3, 9), generator=generator)
    labels[0, :3] = IGNORE_INDEX
    labels[1, :2] = IGNORE_INDEX
    labels[1, 6:] = IGNORE_INDEX
    labels[2, :4] = IGNORE_INDEX
    labels[2, 5:7] = IGNORE_INDEX
    return student, teacher, labels


def _trl_generalized_jsd(
    student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, beta: float, temperature: float
) -> torch.Tensor:
    """TRL's GKD loss, shifted as GKDTrainer.compute_loss shifts it: logits at t against labels at t + 1."""
    return GKDTrainer.generalized_jsd_loss(
        student[:, :-1],
        teacher[:, :-1],
        labels=labels[:, 1:],
        beta=beta,
        temperature=temperature,
        reduction="batchmean",
    )


def _per_token(
    student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, **kw: float
) -> torch.Tensor:
    total, count = token_divergence(student, teacher, labels, **kw)
    return total / count


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("beta", [0.0, 0.25, 0.5, 1.0])
def test_per_token_divergence_equals_trls_generalized_jsd(beta: float, temperature: float) -> None:
    """0.25 as well as 0.5: at 0.5 the mixture is symmetric and would hide swapped weights."""
    student, teacher, labels = _logits_and_labels()

    expected = _trl_generalized_jsd(student, teacher, labels, beta, temperature)
    actual = _per_token(student, teacher, labels, beta=beta, temperature=temperature)

    torch.testing.assert_close(actual, expected, **TOLERANCE)


@pytest.mark.parametrize("beta", [0.0, 0.25, 1.0])
def test_divergence_gradient_equals_trls(beta: float) -> None:
    student, teacher, labels = _logits_and_labels()
    theirs = student.clone().requires_grad_()
    ours = student.clone().requires_grad_()

    _trl_generalized_jsd(theirs, teacher, labels, beta, 2.0).backward()
    _per_token(ours, teacher, labels, beta=beta, temperature=2.0).backward()

    assert ours.grad is not None and theirs.grad is not None
    torch.testing.assert_close(ours.grad, theirs.grad, **TOLERANCE)


@pytest.mark.parametrize("beta", [0.0, 0.25, 1.0])
def test_summed_divergence_equals_trls_distillation_trainer_loss(beta: float) -> None:
    """TRL's (non-experimental) DistillationTrainer scores hidden states through the LM heads in chunks;
    with `num_items_in_batch=1` its loss is the sum over target tokens, as ours is."""
    generator = torch.Generator().manual_seed(1)
    student_hidden, teacher_hidden = torch.randn(2, 3, 9, 16, generator=generator)
    student_head, teacher_head = torch.randn(2, VOCAB, 16, generator=generator)
    _, _, labels = _logits_and_labels()
    is_target = labels[:, 1:] != IGNORE_INDEX

    expected, _, expected_count = _chunked_divergence_loss(
        student_hidden[:, :-1],
        teacher_hidden[:, :-1],
        student_head,
        teacher_head,
        is_target.long(),
        beta,
        num_items_in_batch=1,
        temperature=2.0,
    )
    actual, count = token_divergence(
        student_hidden @ student_head.T, teacher_hidden @ teacher_head.T, labels, beta=beta, temperature=2.0
    )

    torch.testing.assert_close(actual, expected, **TOLERANCE)
    assert count == int(expected_count)


def _categoricals(
    student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor
) -> Iterator[Categorical]:
    is_target = labels[:, 1:] != IGNORE_INDEX
    for logits in (student, teacher):
        yield Categorical(logits=logits[:, :-1][is_target])


def test_beta_0_is_the_forward_kl_from_teacher_to_student() -> None:
    student, teacher, labels = _logits_and_labels()
    student_dist, teacher_dist = _categoricals(student, teacher, labels)
    trls = _trl_generalized_jsd(student, teacher, labels, 0.0, 1.0)

    torch.testing.assert_close(kl_divergence(teacher_dist, student_dist).mean(), trls, **TOLERANCE)
    torch.testing.assert_close(
        _per_token(student, teacher, labels, beta=0.0, temperature=1.0), trls, **TOLERANCE
    )
    assert not torch.isclose(kl_divergence(student_dist, teacher_dist).mean(), trls)


def test_beta_1_is_the_reverse_kl_from_student_to_teacher() -> None:
    student, teacher, labels = _logits_and_labels()
    student_dist, teacher_dist = _categoricals(student, teacher, labels)
    trls = _trl_generalized_jsd(student, teacher, labels, 1.0, 1.0)

    torch.testing.assert_close(kl_divergence(student_dist, teacher_dist).mean(), trls, **TOLERANCE)
    torch.testing.assert_close(
        _per_token(student, teacher, labels, beta=1.0, temperature=1.0), trls, **TOLERANCE
    )
    assert not torch.isclose(kl_divergence(teacher_dist, student_dist).mean(), trls)


def test_micro_batch_sums_add_up_to_the_whole_batch() -> None:
    student, teacher, labels = _logits_and_labels()
    whole, whole_count = token_divergence(student, teacher, labels, beta=0.25, temperature=2.0)

    first, first_count = token_divergence(student[:1], teacher[:1], labels[:1], beta=0.25, temperature=2.0)
    rest, rest_count = token_divergence(student[1:], teacher[1:], labels[1:], beta=0.25, temperature=2.0)

    torch.testing.assert_close(first + rest, whole, **TOLERANCE)
    assert first_count + rest_count == whole_count == int((labels[:, 1:] != IGNORE_INDEX).sum())


def test_a_micro_batch_without_targets_adds_nothing() -> None:
    student, teacher, labels = _logits_and_labels()
    student.requires_grad_()
    total, count = token_divergence(
        student, teacher, torch.full_like(labels, IGNORE_INDEX), beta=0.5, temperature=1.0
    )

    total.backward()

    assert count == 0 and total.item() == 0.0
    assert student.grad is not None and not student.grad.any()


def test_no_gradient_reaches_the_teacher() -> None:
    student, teacher, labels = _logits_and_labels()
    student.requires_grad_()
    teacher.requires_grad_()

    token_divergence(student, teacher, labels, beta=0.5, temperature=1.0)[0].backward()

    assert student.grad is not None and teacher.grad is None
