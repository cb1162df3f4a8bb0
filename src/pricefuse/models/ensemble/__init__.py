"""The blend, the stacker, price intervals and the ablation study."""
