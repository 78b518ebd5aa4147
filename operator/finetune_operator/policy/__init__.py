"""Pure policy: observed cluster state in, verdicts and actions out; no I/O."""
