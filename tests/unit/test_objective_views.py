"""An objective's parts reach the people watching: the trainer's reports carry them into
status.progress.metrics, `ftjob describe` lists them, and loss.png draws them under the loss."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune_operator.api.status import ObjectiveMetrics, Progress
from finetune_operator.jobview import JobView, _metric_series, describe, plot_loss
from finetune_operator.progress import ProgressReport
from finetune_trainer.reporting import Reporter


def _report(step: int, **metrics: float) -> ProgressReport:
    return ProgressReport(progress=Progress(step=step, loss=1.0 / step, metrics=ObjectiveMetrics(**metrics)))


def test_a_training_metric_is_a_point_per_step_and_a_held_out_one_a_point_per_new_value() -> None:
    reports = [
        _report(1, rewards_accuracy=1.0),
        _report(2, rewards_accuracy=1.0, eval_rewards_accuracy=0.5),
        _report(3, rewards_accuracy=1.0, eval_rewards_accuracy=0.5),
        _report(4, rewards_accuracy=0.75, eval_rewards_accuracy=0.75),
    ]
    series = _metric_series(reports)
    assert series["rewardsAccuracy"] == [(1, 1.0), (2, 1.0), (3, 1.0), (4, 0.75)]
    assert series["evalRewardsAccuracy"] == [(2, 0.5), (4, 0.75)]


def test_loss_png_gains_a_panel_for_the_objective_parts(tmp_path: Path) -> None:
    from PIL import Image

    plain = plot_loss([(1, [ProgressReport(progress=Progress(step=s, loss=1.0 / s)) for s in (1, 2)])],
                      tmp_path / "sft.png", "sft")  # fmt: skip
    dpo = plot_loss([(1, [_report(s, rewards_margin=0.1 * s) for s in (1, 2)])], tmp_path / "dpo.png", "dpo")
    assert plain is not None and dpo is not None
    assert Image.open(dpo).height > Image.open(plain).height


def test_the_reporter_keeps_the_latest_training_and_held_out_parts_side_by_side(capsys: Any) -> None:
    reporter = Reporter(enabled=True, total_steps=10, start_step=0, tensorboard_dir=None)
    reporter.step(1, loss=0.6, tokens_per_second=1.0, learning_rate=1e-6, metrics={"rewards_margin": 0.2})
    reporter.evaluation(1, 0.5, {"rewards_accuracy": 0.75})
    reporter.step(2, loss=0.5, tokens_per_second=1.0, learning_rate=1e-6, metrics={"rewards_margin": 0.3})
    assert reporter.progress.metrics == ObjectiveMetrics(rewards_margin=0.3, eval_rewards_accuracy=0.75)
    assert '"metrics":{"rewardsMargin":0.3,"evalRewardsAccuracy":0.75}' in capsys.readouterr().out


def test_describe_lists_the_objective_parts() -> None:
    body = {
        "metadata": {"name": "pref", "namespace": "default"},
        "status": {"progress": {"step": 3, "metrics": {"rewardsAccuracy": 0.75, "rewardsMargin": 0.25}}},
    }
    text = describe(JobView(body, [], []))
    assert "Objective:    rewards accuracy 0.7500, rewards margin 0.2500" in text
