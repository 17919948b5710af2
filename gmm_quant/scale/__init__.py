"""Scale-out on JAX's own SPMD runtime: a device mesh, where each array lives, several processes.

``mesh`` parses ``--mesh data=4`` / ``data=2,model=2`` into a ``jax.sharding.Mesh``; ``placement``
says where the training state lives (batches split over ``data``; parameters, optimiser state and
mixtures replicated, or a matched parameter sharded over ``model``, FSDP-style, by regex on its
path); ``distributed`` starts ``jax.distributed`` for a run over several processes or hosts and
holds what they decide together (one writer, a shared work directory, one config). The
prior sums a sharded layer block by block where it lives (``mixture.log_prob(specs=...)``), and
``compression`` assigns, snaps and counts (Han) it there too; checkpoints are written and verified
shard by shard (``checkpoint``, ``checksums``).
"""
