"""Tiny random diffusers pipelines built in code and saved with save_pretrained, so every pipeline test runs offline.

Real classes, real `from_pretrained` loading; only the sizes are tiny so the suite runs on a CPU.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch


def tiny_tokenizer(root: Path):
    from transformers import CLIPTokenizer
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = ["<|startoftext|>", "<|endoftext|>"] + letters + [ch + "</w>" for ch in letters]
    root.mkdir(parents=True, exist_ok=True)
    (root / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (root / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"), model_max_length=77), len(tokens)


def tiny_text_config(vocab: int, hidden: int = 16, projection: int | None = None):
    from transformers import CLIPTextConfig
    extra = {"projection_dim": projection} if projection else {}
    return CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                          num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                          pad_token_id=1, **extra)


def tiny_vae():
    from diffusers import AutoencoderKL
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                         norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2)


def tiny_scheduler():
    from diffusers import DDIMScheduler
    return DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def build_tiny_sd(root: Path, mid_attention: bool = True, widths: tuple[int, int] = (16, 32), seed: int = 0) -> Path:
    """SD 1.x-shaped: 16 px images (latent 8x8, VAE factor 2), self-attention in the down/mid/up blocks. Other
    `widths` (and `seed`) give a sibling with the same latent space and text conditioning (an autoguidance guide)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel
    tokenizer, vocab = tiny_tokenizer(root / "tok")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=widths,
                                layers_per_block=1, norm_num_groups=8, cross_attention_dim=16, attention_head_dim=4,
                                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                                mid_block_type="UNetMidBlock2DCrossAttn" if mid_attention else None)
    pipe = StableDiffusionPipeline(vae=tiny_vae(), text_encoder=CLIPTextModel(tiny_text_config(vocab)),
                                   tokenizer=tokenizer, unet=unet, scheduler=tiny_scheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(root / "pipe")
    return root / "pipe"


def build_tiny_sdxl(root: Path) -> Path:
    """SDXL-shaped: two text encoders (the second with projection), text_time added conditioning."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection
    tokenizer, vocab = tiny_tokenizer(root / "tok")
    torch.manual_seed(0)
    enc1 = CLIPTextModel(tiny_text_config(vocab, hidden=16))
    enc2 = CLIPTextModelWithProjection(tiny_text_config(vocab, hidden=16, projection=16))
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                layers_per_block=1, norm_num_groups=8, cross_attention_dim=32, attention_head_dim=4,
                                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                                addition_embed_type="text_time", addition_time_embed_dim=8,
                                projection_class_embeddings_input_dim=16 + 6 * 8)
    pipe = StableDiffusionXLPipeline(vae=tiny_vae(), text_encoder=enc1, text_encoder_2=enc2, tokenizer=tokenizer,
                                     tokenizer_2=tokenizer, unet=unet, scheduler=tiny_scheduler())
    pipe.save_pretrained(root / "pipe")
    return root / "pipe"


def tiny_t5(root: Path):
    """T5 tokenizer from a tiny unigram vocabulary (letters and word-initial letters) and a one-layer encoder."""
    from transformers import T5Config, T5EncoderModel, T5Tokenizer
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    vocab += [(c, -2.0) for c in letters] + [("\u2581" + c, -2.5) for c in letters]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)
    config = T5Config(vocab_size=len(vocab), d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return tokenizer, T5EncoderModel(config).eval()


def tiny_if_unet(sample_size: int, super_resolution: bool):
    """IF-shaped UNet: 6 output channels (eps, variance), T5 text projection, simple cross-attention blocks;
    stage II reads 6 channels (noisy + upsampled image) and the noise level as a timestep class label."""
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=6 if super_resolution else 3, out_channels=6,
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", cross_attention_dim=16, encoder_hid_dim=16,
        encoder_hid_dim_type="text_proj", addition_embed_type="text", addition_embed_type_num_heads=2,
        attention_head_dim=8, resnet_time_scale_shift="scale_shift",
        class_embed_type="timestep" if super_resolution else None)


def if_scheduler():
    """IF's scheduler settings: cosine betas, learned variance, dynamic thresholding of x0."""
    from diffusers import DDPMScheduler
    return DDPMScheduler(beta_schedule="squaredcos_cap_v2", variance_type="learned_range", thresholding=True,
                         dynamic_thresholding_ratio=0.95, sample_max_value=1.5, clip_sample=True)


def build_tiny_if(root: Path, size: int = 16, upscale: int = 2) -> tuple[Path, Path]:
    """DeepFloyd IF stage I (size px) and stage II (size * upscale px), saved as two pipelines sharing one T5."""
    from diffusers import DDPMScheduler, IFPipeline, IFSuperResolutionPipeline
    torch.manual_seed(0)  # before the T5 too: its weights may not depend on what ran earlier in the session
    tokenizer, encoder = tiny_t5(root / "tok")
    common = dict(tokenizer=tokenizer, text_encoder=encoder, safety_checker=None, feature_extractor=None,
                  watermarker=None, requires_safety_checker=False)
    stage1 = IFPipeline(unet=tiny_if_unet(size, False), scheduler=if_scheduler(), **common)
    stage2 = IFSuperResolutionPipeline(unet=tiny_if_unet(size * upscale, True), scheduler=if_scheduler(),
                                       image_noising_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2"),
                                       **common)
    stage1.save_pretrained(root / "if-I")
    stage2.save_pretrained(root / "if-II")
    return root / "if-I", root / "if-II"


TINY_CLIP = {"embed_dim": 16,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def build_tiny_clip(root: Path, name: str, seed: int):
    """A randomly initialised open_clip model with CLIP's text tower and a 1-layer ViT on 32 px: its JSON config
    (registered under `name`, the file's stem), its weights as safetensors, and the model itself (eval mode)."""
    import open_clip
    from safetensors.torch import save_file
    config = root / f"{name}.json"
    config.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(config)
    torch.manual_seed(seed)
    model = open_clip.create_model(name).eval()
    weights = root / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return config, weights, model


def tiny_flow_vae():
    """SD3/Flux-style VAE: 4 latent channels here (16 in the real ones), a scaling and a shift factor."""
    from diffusers import AutoencoderKL
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                         norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, scaling_factor=1.5305, shift_factor=0.0609,
                         use_quant_conv=False, use_post_quant_conv=False)


def build_tiny_sd3(root: Path, qk_norm: str | None = "rms_norm") -> Path:
    """SD3-shaped: two CLIP encoders with projection and no T5 (SD3 runs without it: zero T5 embeddings), an MMDiT
    of 2 joint blocks with RMS QK-norm (SD3.5's; `qk_norm=None`: SD3 medium's none), patch 2 over a 16 px image
    (latent 8x8, 4x4 tokens), the scheduler's shift 3."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection
    tokenizer, vocab = tiny_tokenizer(root / "tok")
    torch.manual_seed(0)
    enc1 = CLIPTextModelWithProjection(tiny_text_config(vocab, hidden=16, projection=16))
    enc2 = CLIPTextModelWithProjection(tiny_text_config(vocab, hidden=16, projection=16))
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                        caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=16,
                                        qk_norm=qk_norm)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=tiny_flow_vae(), text_encoder=enc1, tokenizer=tokenizer, text_encoder_2=enc2,
                                    tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(root / "pipe")
    return root / "pipe"


def build_tiny_flux(root: Path, distilled: bool = True) -> Path:
    """Flux-shaped: CLIP pooled + tiny T5 sequence embeddings, 1 double- and 2 single-stream blocks, RoPE over
    (0, row, col) ids, latents packed 2x2 (4 channels -> 16 per token), a guidance embedding when `distilled`,
    the dynamic shift from the image token count."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel
    tokenizer, vocab = tiny_tokenizer(root / "tok")
    torch.manual_seed(0)
    clip = CLIPTextModel(tiny_text_config(vocab, hidden=16))
    tok2, t5 = tiny_t5(root / "tok2")
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                         pooled_projection_dim=16, guidance_embeds=distilled, axes_dims_rope=(4, 6, 6))
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(transformer=transformer, scheduler=scheduler, vae=tiny_flow_vae(), text_encoder=clip,
                        tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=tok2)
    pipe.save_pretrained(root / "pipe")
    return root / "pipe"
