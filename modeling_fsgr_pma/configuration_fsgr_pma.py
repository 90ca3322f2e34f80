"""FSGR-PMA configuration.

One `PretrainedConfig` for the whole captioner: the open_clip vision tower (as open_clip's own model-config
dict), the FSGR encoder (LoRA, deep prompts, concept codebook, SupCon head, interaction layers) and the
PMA-Net decoder (width, depth, prototype memory). Training-loop hyperparameters (learning rate, steps, SCST)
live in the training script's arguments, not here.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

# A tiny ViT so that a model built from the bare default config runs in milliseconds (the tests' size).
DEFAULT_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "quick_gelu": False,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}

PROTOTYPE_DTYPES = ("float32", "float16", "bfloat16")
DENSE_ATTENTIONS = ("sclip", "maskclip")


class FsgrPmaConfig(PretrainedConfig):
    r"""Configuration of [`FsgrPmaForConditionalGeneration`].

    Args:
        clip_config (`dict`, *optional*):
            An open_clip model config (the JSON format of `open_clip/model_configs/*.json`: `embed_dim`,
            `quick_gelu`, `vision_cfg`, `text_cfg`). The captioner builds only the vision tower from it; the
            scripts build the whole CLIP from it to load pretrained weights and embed the concept vocabulary.
            Defaults to a tiny ViT (32 px, 2 layers, width 32).
        clip_model_name (`str`, *optional*):
            open_clip architecture name the config was taken from (e.g. `"ViT-B-16"`); metadata for the scripts.
        clip_pretrained (`str`, *optional*):
            open_clip pretrained tag or checkpoint path the training script loads (e.g. `"openai"`).
        lora_first_block (`int`, *optional*, defaults to 1):
            First vision block that receives LoRA adapters. Without deep prompts the blocks below are frozen and
            their output may be cached (`scripts/extract_features.py`).
        lora_rank (`int`, *optional*, defaults to 4): LoRA rank `r`; 0 disables LoRA in the tower.
        lora_alpha (`int`, *optional*, defaults to 8): LoRA scaling numerator.
        lora_dropout (`float`, *optional*, defaults to 0.0): dropout on the LoRA input.
        lora_target_modules (`list[str]`, *optional*, defaults to `["attn", "mlp.c_fc", "mlp.c_proj"]`):
            Module names inside each adapted block (open_clip's `nn.MultiheadAttention` is `attn`).
        lora_merged (`bool`, *optional*, defaults to `False`):
            Whether the LoRA deltas have been merged into the tower weights (`merge_encoder_lora()`); a merged
            model is built without adapters.
        num_prompt_tokens (`int`, *optional*, defaults to 0):
            Deep visual prompt tokens (VPT-deep, Jia et al., ECCV 2022), as FSGR's tower has them (100 in
            `sclip_model_dpt.py`): a new set before every block of the tower, each through one shared linear
            projection and dropout, and a LayerNorm on the tower's output. Every block then sees trained tokens, so
            only the patch embedding is frozen and cacheable (`frozen_blocks` is 0).
        dense_attention (`str`, *optional*, defaults to `"sclip"`):
            The last vision block's attention for the dense CLIP-space patch embeddings, which give the SupCon
            pseudo-labels and the concept assignment. `"sclip"`: SCLIP's correlative self-attention, per head
            softmax(q qᵀ/√d_h) + softmax(k kᵀ/√d_h) over the patches (Wang et al., "SCLIP: Rethinking Self-Attention
            for Dense Vision-Language Inference", ECCV 2024), as FSGR's code has it. `"maskclip"`: every patch
            attends only to itself, i.e. the value path (Zhou et al., "Extract Free Dense Labels from CLIP", ECCV
            2022); the tiny presets keep it because their shipped CLIPs were pre-trained on it
            (`tools/pretrain_clip.py`). A checkpoint saved before this field existed loads with `"maskclip"`, the
            path it was trained with (`from_dict`).
        num_concepts (`int`, *optional*, defaults to 64): rows of the frozen concept codebook.
        concept_names (`list[str]`, *optional*): the concept vocabulary, one name per codebook row.
        concept_top_k (`int`, *optional*, defaults to 8): concepts pre-selected per image (FSGR: 20).
        concept_logit_scale (`float`, *optional*, defaults to 100.0):
            Scale of the cosine similarities between the dense patch embeddings and the selected concepts, which
            gives the concept-assignment logits (the Gumbel-softmax's input in training): the CLIP checkpoint's own
            `logit_scale.exp()`, as FSGR's code uses its CLIP's (100 for OpenAI's). `scripts/train.py` fills it in
            from the checkpoint it loads.
        use_fsgr (`bool`, *optional*, defaults to `True`):
            `False` gives the "no FSGR" ablation: the decoder reads projected CLIP patch tokens directly.
        num_interaction_layers (`int`, *optional*, defaults to 2): FSGR cross-modal interaction layers (N_s).
        supcon_dim (`int`, *optional*, defaults to 32): width of the SupCon patch head output.
        supcon_weight (`float`, *optional*, defaults to 0.25): weight β of the SupCon loss; 0 disables it.
        supcon_temperature (`float`, *optional*, defaults to 0.07): SupCon temperature τ.
        vocab_size (`int`, *optional*, defaults to 64): caption vocabulary size (the tokenizer's).
        hidden_size (`int`, *optional*, defaults to 32): decoder (and interaction) width d.
        num_hidden_layers (`int`, *optional*, defaults to 2): decoder layers.
        num_attention_heads (`int`, *optional*, defaults to 2): heads of every attention.
        intermediate_size (`int`, *optional*, defaults to 64): MLP width.
        max_position_embeddings (`int`, *optional*, defaults to 32): longest caption, in tokens.
        dropout (`float`, *optional*, defaults to 0.1): residual, attention and embedding dropout.
        layer_norm_eps (`float`, *optional*, defaults to 1e-5)
        initializer_range (`float`, *optional*, defaults to 0.02)
        use_memory (`bool`, *optional*, defaults to `True`): prototypical memory in decoder self-attention.
        num_prototypes (`int`, *optional*, defaults to 16): prototypes m per layer.
        memory_window (`int`, *optional*, defaults to 50): bank window T, in training steps.
        memory_tokens_per_step (`int`, *optional*, defaults to 64):
            Keys/values a layer's bank keeps from each training step (a random subsample of the non-padding
            tokens); the bank holds `memory_window * memory_tokens_per_step` entries.
        memory_warmup_steps (`int`, *optional*, defaults to 100):
            Training steps (optimiser steps of XE) before the first prototype refresh; the memory is off until then.
            PMA-Net does not publish it. With `memory_refresh_every` and `memory_ramp_steps` it is the memory's
            whole schedule: `scripts/train.py` reads it from here and has no flag of its own for it.
        memory_refresh_every (`int`, *optional*, defaults to 50): refresh period R, in optimiser steps.
        memory_ramp_steps (`int`, *optional*, defaults to 0):
            *Our extension of PMA-Net.* Fade the prototypes in over this many steps after the first refresh (their
            attention weights scaled by a factor rising linearly to 1); 0 switches them on at once, as the paper.
        memory_knn (`int`, *optional*, defaults to 8): values averaged per prototype (k nearest bank keys).
        memory_kmeans_iters (`int`, *optional*, defaults to 20): K-Means iterations per refresh.
        memory_prior (`bool`, *optional*, defaults to `False`):
            *Our extension of PMA-Net.* A learned per-head log-prior b_h added to every prototype logit, initialised
            at -log(num_prototypes), so that m prototypes start with the attention share of one extra token and the
            model learns how much of its attention the memory deserves. `False` is the paper's attention.
        prototype_dtype (`str`, *optional*, defaults to `"float32"`): storage dtype of the memory banks.
        use_cache (`bool`, *optional*, defaults to `True`): keep a KV cache during generation.
    """

    model_type = "fsgr_pma"

    def __init__(
        self,
        clip_config: dict | None = None,
        clip_model_name: str | None = None,
        clip_pretrained: str | None = None,
        lora_first_block: int = 1,
        lora_rank: int = 4,
        lora_alpha: int = 8,
        lora_dropout: float = 0.0,
        lora_target_modules: list[str] | None = None,
        lora_merged: bool = False,
        num_prompt_tokens: int = 0,
        dense_attention: str = "sclip",
        num_concepts: int = 64,
        concept_names: list[str] | None = None,
        concept_top_k: int = 8,
        concept_logit_scale: float = 100.0,
        use_fsgr: bool = True,
        num_interaction_layers: int = 2,
        supcon_dim: int = 32,
        supcon_weight: float = 0.25,
        supcon_temperature: float = 0.07,
        vocab_size: int = 64,
        hidden_size: int = 32,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 2,
        intermediate_size: int = 64,
        max_position_embeddings: int = 32,
        dropout: float = 0.1,
        layer_norm_eps: float = 1e-5,
        initializer_range: float = 0.02,
        use_memory: bool = True,
        num_prototypes: int = 16,
        memory_window: int = 50,
        memory_tokens_per_step: int = 64,
        memory_warmup_steps: int = 100,
        memory_refresh_every: int = 50,
        memory_ramp_steps: int = 0,
        memory_knn: int = 8,
        memory_kmeans_iters: int = 20,
        memory_prior: bool = False,
        prototype_dtype: str = "float32",
        use_cache: bool = True,
        pad_token_id: int = 0,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        decoder_start_token_id: int | None = None,
        tie_word_embeddings: bool = True,
        is_encoder_decoder: bool = True,
        **kwargs,
    ):
        self.clip_config = dict(clip_config) if clip_config is not None else _copy(DEFAULT_CLIP_CONFIG)
        self.clip_model_name = clip_model_name
        self.clip_pretrained = clip_pretrained
        self.lora_first_block = lora_first_block
        self.lora_rank = lora_rank
        self.lora_alpha = lora_alpha
        self.lora_dropout = lora_dropout
        self.lora_target_modules = list(lora_target_modules or ["attn", "mlp.c_fc", "mlp.c_proj"])
        self.lora_merged = lora_merged
        self.num_prompt_tokens = num_prompt_tokens
        self.dense_attention = dense_attention
        self.num_concepts = num_concepts
        self.concept_names = list(concept_names) if concept_names is not None else None
        self.concept_top_k = concept_top_k
        self.concept_logit_scale = concept_logit_scale
        self.use_fsgr = use_fsgr
        self.num_interaction_layers = num_interaction_layers
        self.supcon_dim = supcon_dim
        self.supcon_weight = supcon_weight
        self.supcon_temperature = supcon_temperature
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.dropout = dropout
        self.layer_norm_eps = layer_norm_eps
        self.initializer_range = initializer_range
        self.use_memory = use_memory
        self.num_prototypes = num_prototypes
        self.memory_window = memory_window
        self.memory_tokens_per_step = memory_tokens_per_step
        self.memory_warmup_steps = memory_warmup_steps
        self.memory_refresh_every = memory_refresh_every
        self.memory_ramp_steps = memory_ramp_steps
        self.memory_knn = memory_knn
        self.memory_kmeans_iters = memory_kmeans_iters
        self.memory_prior = memory_prior
        self.prototype_dtype = prototype_dtype
        self.use_cache = use_cache
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            decoder_start_token_id=bos_token_id if decoder_start_token_id is None else decoder_start_token_id,
            tie_word_embeddings=tie_word_embeddings,
            is_encoder_decoder=is_encoder_decoder,
            **kwargs,
        )
        self.validate_fsgr_pma()

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs) -> FsgrPmaConfig:
        """A saved config without `dense_attention` predates the field: its model was trained on MaskCLIP's path."""
        return super().from_dict({"dense_attention": "maskclip", **config_dict}, **kwargs)

    # ----------------------------------------------------------------------------------------------------------
    # Derived sizes
    @property
    def vision_cfg(self) -> dict:
        return self.clip_config["vision_cfg"]

    @property
    def clip_embed_dim(self) -> int:
        return int(self.clip_config["embed_dim"])

    @property
    def vision_width(self) -> int:
        return int(self.vision_cfg.get("width", 768))

    @property
    def vision_layers(self) -> int:
        return int(self.vision_cfg.get("layers", 12))

    @property
    def image_size(self) -> int:
        return int(self.vision_cfg.get("image_size", 224))

    @property
    def patch_size(self) -> int:
        return int(self.vision_cfg.get("patch_size", 16))

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def frozen_blocks(self) -> int:
        """Vision blocks whose output depends on no trained parameter: the prefix the feature cache stores."""
        return 0 if self.num_prompt_tokens else self.lora_first_block

    @property
    def memory_bank_size(self) -> int:
        return self.memory_window * self.memory_tokens_per_step

    # ----------------------------------------------------------------------------------------------------------
    def validate_fsgr_pma(self) -> None:
        """Raise a `ValueError` naming the field for every impossible combination."""
        vision = self.clip_config.get("vision_cfg")
        if not isinstance(vision, dict) or "embed_dim" not in self.clip_config:
            raise ValueError("clip_config must be an open_clip model config with 'embed_dim' and 'vision_cfg'")
        if isinstance(vision.get("layers", 12), (list, tuple)) or vision.get("timm_model_name"):
            raise ValueError("clip_config.vision_cfg must describe an open_clip ViT (ResNet/timm towers unsupported)")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"clip_config.vision_cfg.image_size ({self.image_size}) must be a multiple of patch_size "
                f"({self.patch_size})"
            )
        if not 0 <= self.lora_first_block < self.vision_layers:
            raise ValueError(
                f"lora_first_block ({self.lora_first_block}) must lie in [0, {self.vision_layers}) "
                f"(the tower has {self.vision_layers} blocks)"
            )
        _positive(self, "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
        _positive(self, "vocab_size", "max_position_embeddings", "num_concepts", "concept_top_k", "supcon_dim")
        _non_negative(self, "lora_rank", "num_prompt_tokens", "num_interaction_layers", "supcon_weight")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.concept_top_k > self.num_concepts:
            raise ValueError(f"concept_top_k ({self.concept_top_k}) exceeds num_concepts ({self.num_concepts})")
        if self.concept_names is not None and len(self.concept_names) != self.num_concepts:
            raise ValueError(
                f"concept_names has {len(self.concept_names)} names but num_concepts is {self.num_concepts}"
            )
        if self.supcon_temperature <= 0 or self.concept_logit_scale <= 0:
            raise ValueError("supcon_temperature and concept_logit_scale must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("dropout must lie in [0, 1)")
        if self.dense_attention not in DENSE_ATTENTIONS:
            raise ValueError(f"dense_attention must be one of {DENSE_ATTENTIONS}, got {self.dense_attention!r}")
        if self.prototype_dtype not in PROTOTYPE_DTYPES:
            raise ValueError(f"prototype_dtype must be one of {PROTOTYPE_DTYPES}, got {self.prototype_dtype!r}")
        if self.use_memory:
            _positive(self, "num_prototypes", "memory_window", "memory_tokens_per_step", "memory_refresh_every")
            _positive(self, "memory_knn", "memory_kmeans_iters")
            _non_negative(self, "memory_warmup_steps", "memory_ramp_steps")
            if self.num_prototypes > self.memory_bank_size:
                raise ValueError(
                    f"num_prototypes ({self.num_prototypes}) exceeds the bank size memory_window * "
                    f"memory_tokens_per_step ({self.memory_bank_size}): K-Means needs at least one entry per centroid"
                )
            if self.memory_knn > self.memory_bank_size:
                raise ValueError(f"memory_knn ({self.memory_knn}) exceeds the bank size ({self.memory_bank_size})")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
            token_id = getattr(self, name)
            if token_id is None or not 0 <= token_id < self.vocab_size:
                raise ValueError(f"{name} ({token_id}) must be a token id in [0, vocab_size={self.vocab_size})")


def _positive(config: FsgrPmaConfig, *names: str) -> None:
    for name in names:
        if getattr(config, name) <= 0:
            raise ValueError(f"{name} must be positive, got {getattr(config, name)}")


def _non_negative(config: FsgrPmaConfig, *names: str) -> None:
    for name in names:
        if getattr(config, name) < 0:
            raise ValueError(f"{name} must be non-negative, got {getattr(config, name)}")


def _copy(config: dict) -> dict:
    return {key: dict(value) if isinstance(value, dict) else value for key, value in config.items()}


__all__ = ["FsgrPmaConfig"]
