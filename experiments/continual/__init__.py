"""The continual-learning experiment: learn new facts (B) after pretraining on others (A) with
full finetuning, LoRA or sparse memory finetuning, and measure what each forgets."""
