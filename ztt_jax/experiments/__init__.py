"""Experiments that reproduce the paper's claims: the ablation ladder (`ablation`) and its report."""
