"""The shapes of real models, as transformers config dicts written in code (no hub download):
what bench/memory_table.py initialises at random and `sft plan` estimates."""

from __future__ import annotations

from typing import Any

_QWEN = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_act": "silu", "rms_norm_eps": 1e-6,
         "rope_theta": 1000000.0, "max_position_embeddings": 32768, "vocab_size": 151936}
_LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu", "rms_norm_eps": 1e-5,
          "rope_theta": 500000.0, "max_position_embeddings": 131072, "vocab_size": 128256, "head_dim": 64,
          "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 8192}}

ARCHS: dict[str, dict[str, Any]] = {
    "Qwen2.5-0.5B": {**_QWEN, "hidden_size": 896, "num_hidden_layers": 24, "intermediate_size": 4864,
                     "num_attention_heads": 14, "num_key_value_heads": 2, "tie_word_embeddings": True},
    "Llama-3.2-1B": {**_LLAMA, "hidden_size": 2048, "num_hidden_layers": 16, "intermediate_size": 8192,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": True},
    "Qwen2.5-1.5B": {**_QWEN, "hidden_size": 1536, "num_hidden_layers": 28, "intermediate_size": 8960,
                     "num_attention_heads": 12, "num_key_value_heads": 2, "tie_word_embeddings": True},
    "Qwen2.5-3B": {**_QWEN, "hidden_size": 2048, "num_hidden_layers": 36, "intermediate_size": 11008,
                   "num_attention_heads": 16, "num_key_value_heads": 2, "tie_word_embeddings": True},
    "Llama-3.2-3B": {**_LLAMA, "hidden_size": 3072, "num_hidden_layers": 28, "intermediate_size": 8192,
                     "num_attention_heads": 24, "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": True},
    "Qwen2.5-7B": {**_QWEN, "hidden_size": 3584, "num_hidden_layers": 28, "intermediate_size": 18944,
                   "num_attention_heads": 28, "num_key_value_heads": 4, "tie_word_embeddings": False,
                   "vocab_size": 152064},
}
