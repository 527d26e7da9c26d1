"""The paper's protocols and the ablation as grids of training runs, with their reports and plots."""
