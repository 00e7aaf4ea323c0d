"""Image-text model for MMRPT: Megatron-Core's CLIP ViT encoder + its multimodal projector feeding the
Step 3.5 Flash language model (our GPTModel), LLaVA-style: image patches become the embeddings of the
`<image>` placeholder tokens at the start of the sequence.

    vcfg = VisionConfig()                                   # tiny: 32x32 images, 8x8 patches -> 16 tokens
    model = build_step_vlm(lm_cfg, vcfg, parallel)          # StepVLM (a MegatronModule)
    ids = [image_id] * vcfg.num_image_tokens + tok.encode(caption)
    per_token_ce = model(tokens, pos, None, labels=labels, images=images)   # images: (B, 3, H, W)

Why not Megatron-Core's `LLaVAModel` or MIMO: both build the language model themselves from a
TransformerConfig + layer spec (a plain GPTModel), so the Step model's own construction (per-layer
specs, MTP depth weights, moving to the device; `build_step_flash`) would be bypassed, and LLaVA's
sequence parallelism requires TE attention. The pieces are Megatron-Core's: `CLIPViTModel` (patch conv,
position embeddings, ViT TransformerBlock with tensor-parallel linears), `MultimodalProjector`
(tensor-parallel MLP), and the Step GPTModel, which takes the merged embeddings through its own
`decoder_input` argument. Tensor parallelism applies to all three (the word embedding is vocab-parallel
and all-reduced, the ViT and projector linears are column/row parallel); with sequence parallelism the
merged embeddings are scattered along the sequence as GPTModel's own embedding would do. Pipeline
parallelism: the vision tower and projector live on the first stage, with the embedding (later stages
receive hidden states from Megatron-Core's schedule as for text). The RL engine and MMRPT's loop run the
whole model per rank (pp=1); the caption objective is where PP would be used.

Generation: with an inference context (the RL engine's KV cache), images are used only by the call that
fills the cache from position 0 (the prefill); later calls feed text tokens only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule

from megatron_step.models.step_flash import build_step_flash
from megatron_step.models.step_flash.config import StepFlashConfig
from megatron_step.platform.parallel import ParallelConfig


@dataclass
class VisionConfig:
    """The vision tower and projector. Defaults: the tiny CPU preset (a 2-layer ViT, 64 wide)."""

    image_size: int = 32  # square input, pixels (after the data pipeline's resize)
    patch_size: int = 8
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    ffn_hidden_size: int = 128
    projector: str = "mlp"  # mlp (2 layers, GELU, LLaVA-1.5) | affine
    projector_ffn_hidden_size: int = 256
    init_std: float = 0.02

    def __post_init__(self):
        for name in ("image_size", "patch_size", "hidden_size", "num_layers", "num_heads", "ffn_hidden_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"vision.{name}={getattr(self, name)}: must be >= 1")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"vision.image_size={self.image_size} is not a multiple of "
                f"vision.patch_size={self.patch_size}"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"vision.hidden_size={self.hidden_size} is not divisible by vision.num_heads={self.num_heads}"
            )
        if self.projector not in ("mlp", "affine"):
            raise ValueError(f"vision.projector={self.projector!r}: expected 'mlp' or 'affine'")

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def _vision_transformer_config(v: VisionConfig, lm_tcfg):
    from megatron.core.transformer.transformer_config import TransformerConfig

    shared = {
        k: getattr(lm_tcfg, k)
        for k in (
            "tensor_model_parallel_size",
            "sequence_parallel",
            "params_dtype",
            "pipeline_dtype",
            "bf16",
            "use_cpu_initialization",
        )
    }
    return TransformerConfig(
        num_layers=v.num_layers,
        hidden_size=v.hidden_size,
        num_attention_heads=v.num_heads,
        ffn_hidden_size=v.ffn_hidden_size,
        normalization="LayerNorm",
        add_bias_linear=True,
        gated_linear_unit=False,
        activation_func=torch.nn.functional.gelu,
        bias_activation_fusion=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=v.init_std,
        **{**shared, "sequence_parallel": False},  # the ViT's sequence is short; SP is for the LM
    )


def _projector_config(v: VisionConfig, lm_tcfg):
    pcfg = dataclasses.replace(
        _vision_transformer_config(v, lm_tcfg),
        hidden_size=lm_tcfg.hidden_size,  # output width: the language model's
        ffn_hidden_size=v.projector_ffn_hidden_size,
        num_layers=1,  # unused by the projector (an MLP); heads stay the ViT's (a multiple of TP)
    )
    return pcfg


class StepVLM(MegatronModule):
    """CLIP ViT -> projector -> Step language model (see module docstring). `language_model` is the
    Step GPTModel; its MoE routers, RoPE and KV cache are used as they are for text."""

    def __init__(self, language_model, vision: VisionConfig, image_token_id: int):
        from megatron.core.models.vision.clip_vit_model import CLIPViTModel
        from megatron.core.models.vision.multimodal_projector import MultimodalProjector
        from megatron.core.models.vision.vit_layer_specs import get_vit_layer_with_local_spec
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
        from megatron.core.transformer.mlp import MLPSubmodules
        from megatron.core.transformer.torch_norm import WrappedTorchNorm

        super().__init__(config=language_model.config)
        self.vision_config = vision
        self.image_token_id = image_token_id
        self.language_model = language_model
        self.model_type = language_model.model_type  # read by Megatron-Core's schedules
        self.pre_process = language_model.pre_process
        self.vision_model = self.vision_projection = None
        if not self.pre_process:  # a later pipeline stage: hidden states come from the previous one
            return
        vcfg = _vision_transformer_config(vision, language_model.config)
        # local spec (Megatron-Core linears, materialised attention): runs on CPU and GPU alike; the
        # ViT is a small share of the model's time
        self.vision_model = CLIPViTModel(
            vcfg,
            get_vit_layer_with_local_spec(),
            ln_pre_impl=WrappedTorchNorm,
            add_class_token=True,
            patch_dim=vision.patch_size,
            img_h=vision.image_size,
            img_w=vision.image_size,
        )
        self.vision_projection = MultimodalProjector(
            _projector_config(vision, language_model.config),
            MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
            vision.projector,
            input_size=vision.hidden_size,
        )
        self.class_token_len = self.vision_model.class_token_len
        dev = next(language_model.parameters()).device
        if dev.type != "meta":
            # CLIPViTModel's patch conv is a plain torch Conv2d (fp32); the rest follows params_dtype
            self.vision_model.to(device=dev, dtype=vcfg.params_dtype)
            self.vision_projection.to(device=dev, dtype=vcfg.params_dtype)

    # read by Megatron-Core's finalize_model_grads (embedding-group all-reduce under PP)
    @property
    def share_embeddings_and_output_weights(self) -> bool:
        return self.language_model.share_embeddings_and_output_weights

    @property
    def post_process(self) -> bool:
        return self.language_model.post_process

    def shared_embedding_or_output_weight(self):
        return self.language_model.shared_embedding_or_output_weight()

    # Megatron-Core's schedules hand a later pipeline stage its input through this
    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    @property
    def mtp_process(self) -> bool:
        return bool(getattr(self.language_model, "mtp_process", False))

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised pixels -> (P, B, H_lm) embeddings, P = num_image_tokens (the
        class token is dropped, as LLaVA does)."""
        x = self.vision_model(images.to(next(self.vision_model.parameters()).dtype))  # (B, 1 + P, Hv)
        x = x[:, self.class_token_len :]
        x = self.vision_projection(x.permute(1, 0, 2).contiguous())  # (P, B, H_lm)
        return x

    def merged_embeddings(self, input_ids: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Word embeddings (S, B, H) with each sequence's first num_image_tokens `<image>` positions
        replaced by its image's patch embeddings, in order. A later `<image>` token (a sampled response
        may contain one) stays an ordinary token."""
        we = self.language_model.embedding.word_embeddings
        # under sequence parallelism the vocab-parallel embedding reduce-scatters along the sequence;
        # the image slots are placed on the full sequence first, then scattered below (all-reduce +
        # split: the same values and gradients as its reduce-scatter)
        scatter = getattr(we, "reduce_scatter_embeddings", False)
        we.reduce_scatter_embeddings = False
        try:
            words = we(input_ids)  # (B, S, H)
        finally:
            we.reduce_scatter_embeddings = scatter
        p = self.vision_config.num_image_tokens
        is_img = input_ids == self.image_token_id  # (B, S)
        slots = is_img & (is_img.cumsum(1) <= p)
        counts = slots.sum(1)
        if bool((counts != p).any()):
            raise ValueError(
                f"every sequence needs {p} <image> tokens (id {self.image_token_id}) for its image; got "
                f"{counts.tolist()}"
            )
        img = self.image_embeddings(images).to(words.dtype)  # (P, B, H)
        merged = words.clone()
        merged[slots] = img.transpose(0, 1).reshape(-1, img.shape[-1])  # row-major: sequence by sequence
        merged = merged.transpose(0, 1).contiguous()  # (S, B, H)
        if self.config.sequence_parallel:
            merged = tensor_parallel.scatter_to_sequence_parallel_region(merged)
        return merged

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask,
        labels: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        inference_context=None,
        **kwargs,
    ):
        decoder_input = None
        prefill = inference_context is None or inference_context.sequence_len_offset == 0
        if images is not None and prefill and self.pre_process:
            decoder_input = self.merged_embeddings(input_ids, images)
        return self.language_model(
            input_ids,
            position_ids,
            attention_mask,
            decoder_input=decoder_input,
            labels=labels,
            inference_context=inference_context,
            **kwargs,
        )


def vlm_language_config(lm_cfg: StepFlashConfig) -> StepFlashConfig:
    """The language model inside the VLM: MTP off (reconstruction RL samples token by token and the
    engine's process-wide InferenceMode is not needed without it)."""
    return lm_cfg.replace(mtp_num_layers=0, mtp_loss_weights=[])


def build_step_vlm(
    lm_cfg: StepFlashConfig, vision: VisionConfig, parallel: ParallelConfig, image_token_id: int
) -> StepVLM:
    lm = build_step_flash(vlm_language_config(lm_cfg), parallel)  # this rank's pipeline stage
    return StepVLM(lm, vision, image_token_id)


__all__ = ["StepVLM", "VisionConfig", "build_step_vlm", "vlm_language_config"]
