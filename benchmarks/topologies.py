"""The real models' published configs, for the benchmarks and estimates that build them on the meta
device or at reduced width (no weights are read): Stable Diffusion v1.x (UNet, CLIP ViT-L/14 text
encoder, KL autoencoder) and LDM-4 LSUN bedrooms (UNet, VQ-f4 autoencoder)."""

SD_V1_UNET = dict(  # diffusers' defaults for UNet2DConditionModel are SD v1's; these are the ones we vary
    sample_size=64,
    block_out_channels=(320, 640, 1280, 1280),
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)
SD_V1_TEXT_ENCODER = dict(  # CLIPTextConfig
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
)
SD_V1_AUTOENCODER = dict(  # AutoencoderKL, 8x down-sampling: 64x64x4 latents decode to 512x512 images
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)
LDM4_UNET = dict(  # LDM-4 LSUN bedrooms: 64x64x3 VQ-f4 latents
    sample_size=64,
    in_channels=3,
    out_channels=3,
    block_out_channels=(224, 448, 672, 896),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=32,
    norm_num_groups=32,
)
LDM4_AUTOENCODER = dict(  # VQModel, 4x down-sampling: 64x64x3 latents decode to 256x256 images
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(128, 256, 512),
    layers_per_block=2,
    latent_channels=3,
    norm_num_groups=32,
    num_vq_embeddings=8192,
    vq_embed_dim=3,
    sample_size=256,
)
