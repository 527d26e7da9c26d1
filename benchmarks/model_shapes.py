"""Configs of real model shapes (random weights) for the benchmarks, per model family.

CLIP shapes are `CLIPConfig` kwargs, SigLIP shapes `SiglipConfig` kwargs; `family(shape)` says which.
"""

CLIP_SHAPES = {
    "vit-b16": dict(
        vision_config=dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            patch_size=16,
            image_size=224,
        ),
        text_config=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8),
        projection_dim=512,
    ),
    "vit-l14": dict(
        vision_config=dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            patch_size=14,
            image_size=224,
        ),
        text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
        projection_dim=768,
    ),
    # For 2-core CPUs: ViT-B/16's layout (77-token text context, 224 px) at a third of the width and depth.
    "small": dict(
        vision_config=dict(
            hidden_size=256,
            intermediate_size=1024,
            num_hidden_layers=4,
            num_attention_heads=4,
            patch_size=32,
            image_size=224,
        ),
        text_config=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4),
        projection_dim=256,
    ),
    "tiny": dict(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            patch_size=16,
            image_size=32,
        ),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
        projection_dim=32,
    ),
}


def siglip_shape(width: int, layers: int, heads: int, patch: int, image: int, vocab: int = 32000) -> dict:
    """SigLIP's layout: both towers of one width and depth, a 64-token text context, the text head mapping to the
    vision width (the joint space)."""
    tower = dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers, num_attention_heads=heads)
    return dict(
        vision_config=dict(**tower, patch_size=patch, image_size=image),
        text_config=dict(**tower, max_position_embeddings=64, vocab_size=vocab, projection_size=width),
    )


SIGLIP_SHAPES = {
    # google/siglip-base-patch16-224 (transformers' SiglipConfig defaults): 203M parameters.
    "siglip-b16": siglip_shape(width=768, layers=12, heads=12, patch=16, image=224),
    # For 2-core CPUs: SigLIP-B/16's layout (64-token text, 224 px) at the widths and depths of CLIP's "small".
    "siglip-small": siglip_shape(width=256, layers=4, heads=4, patch=32, image=224),
    "siglip-tiny": siglip_shape(width=32, layers=2, heads=2, patch=16, image=32, vocab=1000),
}

SHAPES = {**CLIP_SHAPES, **SIGLIP_SHAPES}


def family(shape: str) -> str:
    """The model family a shape belongs to ("clip" or "siglip"): which config and model class build it."""
    return "siglip" if shape in SIGLIP_SHAPES else "clip"
