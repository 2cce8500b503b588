"""Layer 6: the training loop and what it needs (checkpoints, metrics, optimisers, logs, pictures, DDP).

Submodules import torch; import them directly (`from hrsel.engine.loop import fit`).
"""
