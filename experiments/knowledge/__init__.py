"""The knowledge experiment: does a memory model store more facts than its dense base at equal
compute? `python -m experiments.knowledge --preset small --out dumps/knowledge` trains every
run of the preset on the facts corpus, evaluates facts QA during training, and writes
report.md, results.json and two plots (docs/science.md)."""
