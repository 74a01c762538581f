"""Tiny model configs shared by the tests."""

from seed_jax.models.qformer import QFormerConfig
from seed_jax.models.tokenizer import SeedTokenizerConfig
from seed_jax.models.vit import ViTConfig

TINY_VIT = ViTConfig(image_size=32, patch_size=8, width=32, depth=2, num_heads=2, mlp_dim=64)
TINY_QFORMER = QFormerConfig(width=32, num_layers=4, num_heads=2, mlp_dim=64, encoder_width=32, num_queries=32,
                             vocab_size=50, max_positions=40, dropout=0.0)
TINY_REVERSE = QFormerConfig(width=32, num_layers=2, num_heads=2, mlp_dim=64, encoder_width=32, num_queries=77,
                             causal_queries=False, with_text=False, dropout=0.0)
TINY_TOKENIZER = SeedTokenizerConfig(vit=TINY_VIT, qformer=TINY_QFORMER, reverse_qformer=TINY_REVERSE,
                                     num_codes=64, code_dim=8, decoder_depth=2, decoder_heads=2,
                                     decoder_mlp_dim=64, generation_width=24, proj_dim=16)
