"""Training: the step (step.py), the optimizers and schedules (optim.py), the evaluator,
the divergence guard and the step report, composed by trainer.train."""
