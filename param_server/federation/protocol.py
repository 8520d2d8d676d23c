"""Record keys shared by the federation server side and the institutions' ClientApp.

A train message carries the global tensors (`ARRAYS`) and a `ConfigRecord`
(`CONFIG`). A reply carries the institution's update (`ARRAYS`: only changed
tensors in sparse mode, every tensor in dense mode), one `MetricRecord`
(`METRICS`) with the example count and, when known, the tokens routed to
each expert, and a `ConfigRecord` (`CLIENT`) naming the institution.
"""

from __future__ import annotations

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
CLIENT = "client"

# Train/evaluate config (server -> client).
MODEL_CONFIG = "model-config"
"""config.json of the model, as text: the client builds the architecture."""
TOKENIZER_PREFIX = "tokenizer-file."
"""`tokenizer-file.<name>` -> bytes of one of the model's tokenizer files
(TOKENIZER_FILES), when it has them: institutions with text tokenize it."""
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
"""Files of a model folder that make up its tokenizer."""
BASE_VERSION = "base-version"
UPDATE_MODE = "update-mode"
"""'sparse': send changed tensors in their stored dtype (our strategy);
'dense': send every tensor in a NumPy dtype (Flower's strategies and mods)."""
LOCAL_STEPS = "local-steps"
BATCH_SIZE = "batch-size"
LEARNING_RATE = "lr"
TRAINABLE = "trainable"
SEED = "seed"
PROXIMAL_MU = "proximal-mu"  # Flower's FedProx key

# Reply metrics (client -> server).
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
EVAL_LOSS = "eval-loss"
HELD_OUT_LOSS = "held-out-loss"
"""In a train reply: the received model's loss (nats per token) on the
institution's own held-out split, measured before training."""
HELD_OUT_EXAMPLES = "held-out-examples"
TRAIN_SECONDS = "train-seconds"
"""Wall time the institution spent in its handler (building, training, packing)."""
TOKENS_PREFIX = "expert-tokens."
"""`expert-tokens.<layer>` -> tokens routed to each expert of that layer."""
INSTITUTION = "institution"

SPARSE = "sparse"
DENSE = "dense"
