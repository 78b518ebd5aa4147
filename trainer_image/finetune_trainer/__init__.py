"""The trainer that runs inside every node-rank pod of a FineTuneJob (`python -m finetune_trainer`)."""
