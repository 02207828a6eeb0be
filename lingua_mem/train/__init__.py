"""Training: the step (step.py; its optimizer and schedules: lingua_mem/optim.py), the evaluator,
the divergence guard and the step report, composed by trainer.train."""
