"""Code scoring (HumanEval, MBPP): programs built from completions, run in the sandbox, pass@k."""
