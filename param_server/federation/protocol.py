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
LORA_RANK = "lora-rank"
"""> 0: LoRA mode. Institutions train low-rank adapters and reply with them
(`LORA_A`/`LORA_B` keys) instead of whole tensors."""
LORA_ALPHA = "lora-alpha"
"""The adapters' scale is alpha / rank: a tensor's update is that times B @ A."""
LORA_TARGETS = "lora-targets"
"""`experts` or `experts+attention` (or a regex over `nn.Linear` module names,
beyond the routed experts)."""

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
LORA = "lora"

# Reply keys of LoRA mode: `<wire key>::lora_A` (rank x in) and
# `<wire key>::lora_B` (out x rank), in the tensor's stored dtype.
LORA_A = "::lora_A"
LORA_B = "::lora_B"


def adapter_of(key: str) -> tuple[str, str] | None:
    """(wire key, "A" or "B") of an adapter reply key, else None."""
    for suffix, half in ((LORA_A, "A"), (LORA_B, "B")):
        if key.endswith(suffix):
            return key[: -len(suffix)], half
    return None
