"""The pretraining loop on megatron-core (DDP, optimizer, schedules, metrics)."""
