"""LinguaMemConfig: a Llama decoder whose FFN at `memory_layers` is a product-key memory
(Memory+). Written by lingua_mem's export-hf; needs torch and transformers only."""

from transformers import PretrainedConfig


class LinguaMemConfig(PretrainedConfig):
    model_type = "lingua_mem"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    def __init__(self, vocab_size=258, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=None, rms_norm_eps=1e-5, rope_theta=10000.0,
                 max_position_embeddings=2048, tie_word_embeddings=False, memory_layers=(),
                 memory_n_keys=1024, memory_heads=4, memory_knn=32, memory_k_dim=128, memory_v_dim=256,
                 memory_shared_values=True, memory_swilu=True, memory_qk_norm=False,
                 memory_query_batchnorm=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                 use_cache=True, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = hidden_size // num_attention_heads
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.memory_layers = list(memory_layers)
        self.memory_n_keys = memory_n_keys
        self.memory_heads = memory_heads
        self.memory_knn = memory_knn
        self.memory_k_dim = memory_k_dim
        self.memory_v_dim = memory_v_dim
        self.memory_shared_values = memory_shared_values
        self.memory_swilu = memory_swilu
        self.memory_qk_norm = memory_qk_norm
        self.memory_query_batchnorm = memory_query_batchnorm
        self.use_cache = use_cache
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)
