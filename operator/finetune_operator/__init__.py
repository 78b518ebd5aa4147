"""finetune-operator: runs FineTuneJobs (distributed DeepSpeed fine-tuning) on Kubernetes or one machine."""

__version__ = "0.1.0"
