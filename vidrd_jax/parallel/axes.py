"""Logical axis names, the one vocabulary shared by model parameters and sharding rules.

Model code annotates every parameter with these names (``nn.with_logical_partitioning``);
``vidrd_jax.parallel.sharding`` maps them to mesh axes with rules taken from the config, as
maxtext and maxdiffusion do. A name that no rule mentions stays replicated.
"""

# Activations.
BATCH = "batch"
FRAMES = "frames"
LENGTH = "length"          # tokens: text positions, or H*W spatial positions

# Parameters.
EMBED = "embed"            # the model width on the input side of a dense kernel
MLP = "mlp"                # feed-forward hidden width
HEADS = "heads"            # attention projection output (num_heads * head_dim)
VOCAB = "vocab"            # token embedding table rows
CONV_IN = "conv_in"        # conv kernel input channels
CONV_OUT = "conv_out"      # conv kernel output channels
NORM = "norm"              # scale / bias vectors of GroupNorm and LayerNorm
KERNEL_SPATIAL = None      # conv kernel height / width / time taps: never sharded
