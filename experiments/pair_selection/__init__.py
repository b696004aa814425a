"""The Pair Selection study: the ablation (arms, paired statistics, the plan's decision rule), the trajectory
analysis and the corpus partner statistics, their test-bed configs and results. See README.md and LOG.md."""
