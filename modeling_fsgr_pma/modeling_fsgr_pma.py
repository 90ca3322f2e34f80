"""FSGR-PMA: a CLIP captioner with semantically quantised patch features and a prototypical-memory decoder.

The whole forward pass lives in this file and reads top to bottom:
outputs → building blocks → vision tower → FSGR encoder → prototypical memory attention → decoder → model.

References:
- FSGR: Gao et al., "Fully Semantic Gap Recovery for End-to-End Image Captioning", IEEE TCSVT 2025.
  Local contrastive learning (SupCon over patches), semantic quantisation on a frozen CLIP-text concept
  codebook, fine-grained cross-modal interaction.
- PMA-Net: Barraco et al., "With a Little Help from your own Past: Prototypical Memory Networks for Image
  Captioning", ICCV 2023. Decoder self-attention that also attends to K-Means prototypes of past keys/values.
- SCLIP: Wang et al., "SCLIP: Rethinking Self-Attention for Dense Vision-Language Inference", ECCV 2024
  (correlative self-attention for the dense CLIP-space patch embeddings, as FSGR's code uses).
- MaskCLIP: Zhou et al., "Extract Free Dense Labels from CLIP", ECCV 2022 (the alternative dense embeddings).
- SupCon: Khosla et al., "Supervised Contrastive Learning", NeurIPS 2020.

Speed. Three mechanisms beyond transformers' and FSGR's usual code remain, because each earned at least 3% of a
whole captioning call at the size users run (`configuration/model/vit-b16.json`, `tools/benchmark_mechanisms.py`, see
docs/benchmarks-mechanisms.md). In the encoder, FSGR's deep prompts enter every ViT block as keys and values only
(`prompted_block`): their outputs are dropped after each block, so their queries and MLP are not computed (16-18% of
a call at batch 1, 41-51% at batch 32); and inference reuses those keys and values while their weights are unchanged
(`prompt_keys_values`: 4-8% of a call at batch 1, where they would be made per image). In decoding, the r rows of
an image in `generate` (beams, returned sequences) share one copy of its cross-attention keys/values
(`FsgrPmaCache.rows_per_image`, set by `_expand_inputs_for_generation`), which also spares beam search reordering
them at every step: 7.7% of a call at batch 32 with 5 beams. Memory attention scores the prototypes with one matmul
per head for the whole batch (`attend_with_prototypes`); they never enter the cache. Measured below 3% and removed:
a private SDPA function beside `ALL_ATTENTION_FUNCTIONS`, reusing the per-head prototypes (while the tensors'
`id`/`_version` were unchanged, or for one `generate` call), prototypes as a fixed prefix of the self-attention
cache (used only up to 64 prototypes, slower than the shared matmul at 256), and an override of
`prepare_inputs_for_generation`. `_is_ready` keeps the memory flag as a Python bool for `torch.compile`/`export`.

This file is remote code: it imports only public packages and `configuration_fsgr_pma`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.model import _build_vision_tower
from open_clip.pos_embed import get_2d_sincos_pos_embed
from open_clip.transformer import LayerScale, VisionTransformer
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.layer import MultiheadAttention as LoraMultiheadAttention
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput, can_return_tuple, logging

from .configuration_fsgr_pma import FsgrPmaConfig

try:
    import faiss
except ImportError:  # FAISS is optional: K-Means falls back to the torch implementation below.
    faiss = None

logger = logging.get_logger(__name__)


# ==============================================================================================================
# Outputs
# ==============================================================================================================
@dataclass
class FsgrPmaEncoderOutput(ModelOutput):
    """Output of [`FsgrPmaEncoder`].

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(B, n_patches, hidden_size)`):
            The visual memory Z the decoder cross-attends to.
        hidden_states (`tuple(torch.FloatTensor)`, returned with `output_hidden_states=True`):
            The visual stream through the FSGR interaction layers, `(B, n_patches, hidden_size)` each: the projected
            patches, then every layer's output (`num_interaction_layers + 1` tensors; one, the projected patches with
            their positions, when `use_fsgr=False`). Taken before the final LayerNorm.
        attentions (`tuple(torch.FloatTensor)`, returned with `output_attentions=True` and eager attention):
            Every interaction layer's weights, `(B, heads, n_patches, n_patches)`: patches (queries) over the
            language-bridged map (keys); empty when `use_fsgr=False`.
        patch_concepts (`torch.LongTensor` of shape `(B, n_patches)`): codebook row assigned to every patch.
        selected_concepts (`torch.LongTensor` of shape `(B, concept_top_k)`): the per-image pre-selected concepts.
        supcon_features (`torch.FloatTensor` of shape `(B, n_patches, supcon_dim)`): L2-normalised SupCon features.
        patch_labels (`torch.LongTensor` of shape `(B, n_patches)`): SupCon pseudo-labels (frozen-tower argmax).
    """

    last_hidden_state: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    patch_concepts: torch.LongTensor | None = None
    selected_concepts: torch.LongTensor | None = None
    supcon_features: torch.FloatTensor | None = None
    patch_labels: torch.LongTensor | None = None


@dataclass
class FsgrPmaModelOutput(ModelOutput):
    """Output of [`FsgrPmaModel`] (the fields of transformers' `Seq2SeqModelOutput`, then ours).

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(B, T, hidden_size)`): the decoder's final hidden states.
        past_key_values, decoder_hidden_states, decoder_attentions, cross_attentions, encoder_last_hidden_state,
        encoder_hidden_states, encoder_attentions, patch_concepts: as in [`FsgrPmaOutput`].
        supcon_features (`torch.FloatTensor` of shape `(B, n_patches, supcon_dim)`), patch_labels
            (`torch.LongTensor` of shape `(B, n_patches)`): the SupCon head's features and pseudo-labels (training).
    """

    last_hidden_state: torch.FloatTensor | None = None
    past_key_values: Cache | None = None
    decoder_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    decoder_attentions: tuple[torch.FloatTensor, ...] | None = None
    cross_attentions: tuple[torch.FloatTensor, ...] | None = None
    encoder_last_hidden_state: torch.FloatTensor | None = None
    encoder_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    encoder_attentions: tuple[torch.FloatTensor, ...] | None = None
    patch_concepts: torch.LongTensor | None = None
    supcon_features: torch.FloatTensor | None = None
    patch_labels: torch.LongTensor | None = None


@dataclass
class FsgrPmaOutput(ModelOutput):
    """Output of [`FsgrPmaForConditionalGeneration`] (the fields of transformers' `Seq2SeqLMOutput`, then ours).

    Args:
        loss (`torch.FloatTensor` of shape `()`): `xe_loss + supcon_weight * supcon_loss` when `labels` are given.
        logits (`torch.FloatTensor` of shape `(B, T, vocab_size)`): next-token logits.
        past_key_values (`EncoderDecoderCache`): self- and cross-attention cache; never holds prototypes.
        decoder_hidden_states (`tuple(torch.FloatTensor)`): per-layer `(B, T, hidden_size)`, with the embeddings.
        decoder_attentions (`tuple(torch.FloatTensor)`): per-layer `(B, heads, T, S + m)`: the S = past + T sequence
            columns, then the m prototype columns (m = `num_prototypes` while the memory is active, 0 while it is
            empty or off). Each row sums to one over all S + m columns.
        cross_attentions (`tuple(torch.FloatTensor)`): per-layer `(B, heads, T, n_patches)`.
        encoder_last_hidden_state (`torch.FloatTensor` of shape `(B, n_patches, hidden_size)`).
        encoder_hidden_states, encoder_attentions: the encoder's `hidden_states` and `attentions`
            ([`FsgrPmaEncoderOutput`]).
        patch_concepts (`torch.LongTensor` of shape `(B, n_patches)`): codebook row assigned to every patch.
        xe_loss, supcon_loss (`torch.FloatTensor` of shape `()`): the two terms of `loss`.

    The attentions are returned with `output_attentions=True` under `attn_implementation="eager"`; SDPA computes
    no weights.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    past_key_values: Cache | None = None
    decoder_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    decoder_attentions: tuple[torch.FloatTensor, ...] | None = None
    cross_attentions: tuple[torch.FloatTensor, ...] | None = None
    encoder_last_hidden_state: torch.FloatTensor | None = None
    encoder_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    encoder_attentions: tuple[torch.FloatTensor, ...] | None = None
    patch_concepts: torch.LongTensor | None = None
    xe_loss: torch.FloatTensor | None = None
    supcon_loss: torch.FloatTensor | None = None


# ==============================================================================================================
# Building blocks
# ==============================================================================================================
def sine_positions_2d(grid_size: int, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """2-D sine-cosine positions of a square patch grid, `(grid_size**2, dim)` (DETR / MAE style)."""
    if dim % 4:
        raise ValueError(f"2-D sine positions need a width divisible by 4, got {dim}")
    coords = torch.arange(grid_size, device=device, dtype=torch.float32)
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")  # (g, g) each
    freqs = 1.0 / 10000 ** (torch.arange(dim // 4, device=device, dtype=torch.float32) / (dim // 4))
    out_y = ys.reshape(-1, 1) * freqs  # (n, dim/4)
    out_x = xs.reshape(-1, 1) * freqs  # (n, dim/4)
    return torch.cat([out_y.sin(), out_y.cos(), out_x.sin(), out_x.cos()], dim=1).to(dtype)  # (n, dim)


def supcon_loss(features: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised contrastive loss over all patches of a batch (Khosla et al. 2020, eq. 2, "L_out").

    Patches with the same pseudo-label are positives. Anchors without any positive are left out.

    Args:
        features: `(N, D)` L2-normalised features.
        labels: `(N,)` integer labels.
        temperature: τ.
    """
    features = features.float()
    logits = features @ features.T / temperature  # (N, N)
    self_mask = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)  # (N, N)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask  # (N, N)
    num_positives = positives.sum(1)
    has_positive = num_positives > 0
    if not has_positive.any():
        return features.sum() * 0.0
    positive_log_prob = log_prob.masked_fill(~positives, 0.0).sum(1)  # (N,)
    return -(positive_log_prob[has_positive] / num_positives[has_positive]).mean()


class FsgrPmaMLP(nn.Module):
    def __init__(self, config: FsgrPmaConfig):
        super().__init__()
        self.fc_in = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc_out = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc_out(F.gelu(self.fc_in(hidden_states))))


# Adapted from transformers' `eager_attention_forward` (e.g. models/llama/modeling_llama.py): the reference
# implementation behind `attn_implementation="eager"`, the one that returns the weights.
def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scaling + mask) v for `(B, h, T, hd)` queries against `(B, h, S, hd)` keys/values.

    `attention_mask` is boolean, broadcastable to `(B, h, T, S)`, True where attention is allowed, or a float
    `(B, h, T, S)` added to the scores; None lets every query see every key. Returns the output `(B, T, h, hd)` (the
    layout of transformers' attention functions) and the weights `(B, h, T, S)`.
    """
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = query @ key.transpose(-1, -2) * scaling  # (B, h, T, S)
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    elif attention_mask is not None:
        scores = scores + attention_mask
    weights = scores.softmax(-1, dtype=torch.float32).to(query.dtype)
    out = F.dropout(weights, p=dropout, training=module.training) @ value  # (B, h, T, hd)
    return out.transpose(1, 2).contiguous(), weights


def attend_with_prototypes(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    memory_keys: torch.Tensor,
    memory_values: torch.Tensor,
    memory_offset: torch.Tensor,
    memory_bias: torch.Tensor | None,
    dropout: float,
    output_attentions: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`attend` over `[key ; memory_keys + memory_offset]` and `[value ; memory_values]`, without copying the memory.

    `(B, h, T, hd)` queries, `(B, h, S, hd)` keys/values with a boolean `(B, 1, T, S)` mask (or None), and
    `(h, m, hd)` memory keys/values shared by the batch, which every query sees. `memory_offset` `(h, hd, 1)` is
    added to every memory key, as one logit per query and head; `memory_bias` `(h, 1, 1)` (or None) to every memory
    logit. The memory is scored and read by one matmul per head for all B * T queries; one softmax runs over the
    S + m scores of each query.
    """
    batch, heads, length, head_dim = query.shape
    query = query * head_dim**-0.5
    scores = query @ key.transpose(-1, -2)  # (B, h, T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    rows = query.transpose(0, 1).reshape(heads, batch * length, head_dim)  # (h, B * T, hd)
    shift = rows @ memory_offset if memory_bias is None else rows @ memory_offset + memory_bias  # (h, B * T, 1)
    memory_scores = torch.baddbmm(shift, rows, memory_keys.transpose(-1, -2))  # (h, B * T, m)
    memory_scores = memory_scores.view(heads, batch, length, -1).transpose(0, 1)  # (B, h, T, m)
    weights = torch.cat([scores, memory_scores], dim=-1).softmax(-1)  # (B, h, T, S + m)
    kept = F.dropout(weights, p=dropout) if dropout else weights
    sequence_weights, memory_weights = kept.split([key.shape[2], memory_keys.shape[1]], dim=-1)
    memory_weights = memory_weights.transpose(0, 1).reshape(heads, batch * length, -1)  # (h, B * T, m)
    read = (memory_weights @ memory_values).view(heads, batch, length, head_dim).transpose(0, 1)  # (B, h, T, hd)
    return sequence_weights @ value + read, (weights if output_attentions else None)


def attention_function(config: FsgrPmaConfig) -> Callable:
    """The attention function `config._attn_implementation` names (transformers' `ALL_ATTENTION_FUNCTIONS`; SDPA by
    default), or eager. Called with explicit masks and `is_causal=False`: no causality is inferred from the shapes."""
    return ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager_attention_forward)


class FsgrPmaCrossAttention(nn.Module):
    """Multi-head cross-attention; keys/values come from a second sequence and can be cached (generation)."""

    def __init__(self, config: FsgrPmaConfig, layer_idx: int | None = None):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.layer_idx = layer_idx
        self.dropout = config.dropout
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:2], self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, L, hd)

    def forward(
        self,
        hidden_states: torch.Tensor,
        key_states: torch.Tensor,
        value_states: torch.Tensor | None = None,
        past_key_values: EncoderDecoderCache | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`hidden_states` `(B, T, d)` attend to `key_states`/`value_states` `(B, S, d)` (values default to keys).

        In `generate`, the r rows of an image (its beams or returned sequences) share its keys and values: an
        [`FsgrPmaCache`] keeps one copy per image, `(B / r, h, S, hd)`, and the image's r rows of queries attend
        to it as one sequence of r * T queries (no mask, so every query's softmax is its own).
        """
        batch, length, _ = hidden_states.shape
        cache = past_key_values.cross_attention_cache if past_key_values is not None else None
        if cache is not None and past_key_values.is_updated.get(self.layer_idx):
            key, value = cache.layers[self.layer_idx].keys, cache.layers[self.layer_idx].values
        else:
            rows_per_image = past_key_values.rows_per_image if isinstance(past_key_values, FsgrPmaCache) else 1
            value_states = key_states if value_states is None else value_states
            key = self._split_heads(self.k_proj(key_states[::rows_per_image]))  # (G, h, S, hd), G = B / r
            value = self._split_heads(self.v_proj(value_states[::rows_per_image]))  # (G, h, S, hd)
            if cache is not None:
                key, value = cache.update(key, value, self.layer_idx)
                past_key_values.is_updated[self.layer_idx] = True
        groups = key.shape[0]  # images (B without a shared cache)
        query = self.q_proj(hidden_states).view(groups, -1, self.num_heads, self.head_dim).transpose(1, 2)
        dropout = self.dropout if self.training else 0.0
        out, weights = attention_function(self.config)(
            self, query, key, value, None, dropout=dropout, scaling=self.scaling, is_causal=False,
            output_attentions=output_attentions,
        )  # (G, r * T, h, hd)
        out = out.reshape(*hidden_states.shape)  # (B, T, d)
        if weights is not None and groups != batch:  # shared keys: (G, h, r * T, S) → (B, h, T, S)
            weights = weights.unflatten(2, (-1, length)).transpose(1, 2).flatten(0, 1)
        return self.out_proj(out), (weights if output_attentions else None)


# ==============================================================================================================
# Vision tower: open_clip ViT with LoRA, deep prompts and SCLIP / MaskCLIP dense embeddings
# ==============================================================================================================
def lora_attention_weights(attn: LoraMultiheadAttention) -> tuple[torch.Tensor, torch.Tensor]:
    """The input and output projection weights a PEFT LoRA `nn.MultiheadAttention` attends with, `(3 d_v, d_v)` and
    `(d_v, d_v)`: PEFT's W_in + ΔW_in and W_out + 2 ΔW_out (see `FsgrPmaLoraMultiheadAttention`) with its active
    adapters, the base layer's own weights when they are disabled or merged."""
    base = attn.get_base_layer()  # nn.MultiheadAttention
    out_proj = base.out_proj  # PEFT lora.Linear
    in_weight, out_weight = base.in_proj_weight, out_proj.get_base_layer().weight
    if attn.disable_adapters or attn.merged:
        return in_weight, out_weight
    for name in attn.active_adapters:
        if name in attn.lora_A:
            in_weight = in_weight + attn.get_delta_weight(name).to(in_weight.dtype)  # (3 d_v, d_v)
            out_delta = out_proj.get_delta_weight(name).to(out_weight.dtype)  # (d_v, d_v)
            out_weight = out_weight + out_delta + out_delta.detach()
    return in_weight, out_weight


class FsgrPmaLoraMultiheadAttention(LoraMultiheadAttention):
    """PEFT's LoRA `nn.MultiheadAttention` (same modules and state-dict names), made traceable.

    PEFT's forward writes W + ΔW into the wrapped module at every call and restores it after (deleting and
    re-registering the parameters), and re-registers them again whenever the modules are listed; under `torch.export`
    (which lists them with its fake tensors swapped in) that leaves fake tensors in the model. Here the adapted
    weights are passed to the base module functionally (`torch.func.functional_call`), and parameters are
    re-registered only after PEFT's own merge or unmerge. The weights are exactly PEFT's (0.21): W_in + ΔW_in, and
    W_out + 2 ΔW_out, because PEFT's forward and merge add the output projection's delta a second time through the
    wrapped `lora.Linear`'s own merge, an in-place write that autograd does not see (its gradient is that of one
    ΔW_out). Matching it keeps outputs, gradients and LoRA-merged checkpoints what PEFT gives.
    Source: https://github.com/huggingface/peft/blob/main/src/peft/tuners/lora/layer.py (MultiheadAttention).
    """

    def forward(self, query: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        adapters = [name for name in self.active_adapters if name in self.lora_A]
        if self.disable_adapters or self.merged or not adapters:
            return super().forward(query, *args, **kwargs)
        in_weight, out_weight = lora_attention_weights(self)
        adapted = {"in_proj_weight": in_weight, "out_proj.base_layer.weight": out_weight}
        result = torch.func.functional_call(self.get_base_layer(), adapted, (query, *args), kwargs)
        return result[0].to(query.dtype), (result[1].to(query.dtype) if result[1] is not None else None)

    def _restore_weights(self) -> None:
        base = self.get_base_layer()
        weights = (base.in_proj_weight, base.out_proj.get_base_layer().weight)
        if not all(isinstance(weight, nn.Parameter) for weight in weights):  # after PEFT's merge or unmerge
            super()._restore_weights()


def init_lora(layer: LoraLayer) -> None:
    """LoRA's init (PEFT `init_lora_weights=True`): A like `nn.Linear`'s default, B zero, so that the adapters start at
    0. transformers' guarded init functions leave loaded weights as they are."""
    for name in layer.lora_A:
        init.kaiming_uniform_(layer.lora_A[name].weight, a=math.sqrt(5))
        init.zeros_(layer.lora_B[name].weight)


def value_path(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An open_clip residual block where every token attends only to itself, `(B, L, d_v)` → `(B, L, d_v)`.

    Self-only attention weighs one key by softmax(·) = 1, so the attention output is the value projection: the query
    and key projections, scores and softmax drop out. Equal to `block(x.reshape(B * L, 1, d_v))`, at a third of the
    input projection's cost.
    """
    attn, width = block.attn, x.shape[-1]
    bias = attn.in_proj_bias[2 * width :] if attn.in_proj_bias is not None else None
    values = F.linear(block.ln_1(x), attn.in_proj_weight[2 * width :], bias)  # (B, L, d_v)
    x = x + block.ls_1(attn.out_proj(values))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def attention_projections(attn: nn.Module) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What an open_clip block's `nn.MultiheadAttention` attends with: its heads, the `(3 d_v, d_v)` input projection
    and its bias, the `(d_v, d_v)` output projection and its bias; a LoRA-wrapped one's W + ΔW, as its forward uses
    (`lora_attention_weights`)."""
    if isinstance(attn, LoraMultiheadAttention):
        in_weight, out_weight = lora_attention_weights(attn)
        base = attn.get_base_layer()
        return base.num_heads, in_weight, base.in_proj_bias, out_weight, base.out_proj.get_base_layer().bias
    return attn.num_heads, attn.in_proj_weight, attn.in_proj_bias, attn.out_proj.weight, attn.out_proj.bias


def correlative_attention(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """SCLIP's correlative self-attention (CSA) with the weights of an open_clip block's attention,
    `(B, L, d_v)` → `(B, L, d_v)` (after `out_proj`).

    Per head, softmax(q qᵀ/√d_h) + softmax(k kᵀ/√d_h) weighs the values instead of softmax(q kᵀ/√d_h): each token
    gathers the tokens that project like it, which localises CLIP's patch semantics (Wang et al., ECCV 2024). A
    LoRA-wrapped attention (training, or a PEFT adapter on a release) contributes its W + ΔW, as its forward does.
    Source: https://github.com/wangf3014/SCLIP/blob/main/clip/model.py (`VisionTransformer.custom_attn`, csa=True),
    as in FSGR's code (github.com/wxdaxx/FSGR11.15, `FSGR/models/fsgr/sclip_model_dpt.py`, `custom_attn`).
    """
    heads, in_weight, in_bias, out_weight, out_bias = attention_projections(attn)
    qkv = F.linear(x, in_weight, in_bias).unflatten(-1, (3, heads, -1))  # (B, L, 3, h, d_h)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, h, L, d_h)
    scale = q.shape[-1] ** -0.5  # weights below: (B, h, L, L)
    weights = (q @ q.transpose(-2, -1) * scale).softmax(-1) + (k @ k.transpose(-2, -1) * scale).softmax(-1)
    out = (weights @ v).transpose(1, 2).flatten(2)  # (B, L, d_v)
    return F.linear(out, out_weight, out_bias)


def prompted_block(block: nn.Module, x: torch.Tensor, prompt_kv: torch.Tensor) -> torch.Tensor:
    """An open_clip residual block over the tokens `x` `(B, 1 + n, d_v)` and the keys and values of a deep-prompt set
    `(P, 2 d_v)` shared by the batch (`prompt_keys_values`) that returns the outputs of `x` only, `(B, 1 + n, d_v)`.

    VPT-deep discards every block's prompt outputs (the next block brings a new set), so the prompts need keys and
    values but no queries, attention rows or MLP: the same result as running the block over FSGR's sequence
    `[cls; prompts; patches]` and dropping the prompts (keys are unordered without a mask), at about 1.1× the
    unprompted block's multiply-adds instead of 1.5× (ViT-B/16, 100 prompts, 196 patches). The attention runs as one
    fused SDPA call on the block's projections (with LoRA's W + ΔW in training), as `nn.MultiheadAttention` would
    for self-attention.
    """
    heads, in_weight, in_bias, out_weight, out_bias = attention_projections(block.attn)
    batch, _, width = x.shape
    qkv = F.linear(block.ln_1(x), in_weight, in_bias)  # (B, 1 + n, 3 d_v)
    kv = torch.cat([qkv[..., width:], prompt_kv.expand(batch, -1, -1)], dim=1)  # (B, 1 + n + P, 2 d_v)
    q = qkv[..., :width].unflatten(-1, (heads, -1)).transpose(1, 2)  # (B, h, 1 + n, d_h)
    k, v = kv.unflatten(-1, (2, heads, -1)).permute(2, 0, 3, 1, 4)  # each (B, h, 1 + n + P, d_h)
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)  # (B, 1 + n, d_v)
    x = x + block.ls_1(F.linear(out, out_weight, out_bias))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


class FsgrPmaVisionTower(nn.Module):
    """The open_clip ViT, run block by block so that the frozen prefix can be cached and prompts inserted.

    The ViT's own modules are used unchanged (`conv1`, `class_embedding`, `positional_embedding`, `ln_pre`,
    `transformer.resblocks`, `ln_post`, `proj`), so open_clip checkpoints load into `self.visual` as they are.
    Source: https://github.com/mlfoundations/open_clip/blob/main/src/open_clip/transformer.py (VisionTransformer).
    """

    def __init__(self, config: FsgrPmaConfig, visual: nn.Module | None = None):
        """Build the ViT from `config.clip_config`, or run the given open_clip `visual` (a CLIP's, pre-training it)."""
        super().__init__()
        clip = config.clip_config
        if visual is None:
            visual = _build_vision_tower(clip["embed_dim"], clip["vision_cfg"], clip.get("quick_gelu", False))
        self.visual = visual
        if getattr(self.visual, "attn_pool", None) is not None or self.visual.pool_type != "tok":
            raise ValueError("clip_config.vision_cfg must use the class-token pool ('tok') without attention pooling")
        self.first_adapted_block = config.frozen_blocks
        self.dense_attention = config.dense_attention
        self.prompts = self.prompt_proj = self.prompt_norm = None
        if config.num_prompt_tokens:  # FSGR's VPT-deep (sclip_model_dpt.py): one set per block, shared projection
            width = config.vision_width
            self.prompts = nn.Parameter(torch.zeros(config.vision_layers, config.num_prompt_tokens, width))
            self.prompt_proj = nn.Linear(width, width)
            self.prompt_dropout = nn.Dropout(config.dropout)
            self.prompt_norm = nn.LayerNorm(width, eps=1e-6)
        self._prompt_kv = None  # (weights' identity, keys and values) reused in inference: `prompt_keys_values`
        self.gradient_checkpointing = False  # set by `activation_checkpointing_enable()` (with its function)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.visual.transformer.resblocks

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch embedding + class token + positions + `ln_pre`: `(B, 3, H, W)` → `(B, 1 + n, d_v)`."""
        visual = self.visual
        x = visual.conv1(pixel_values.to(visual.conv1.weight.dtype))  # (B, d_v, g, g)
        x = x.flatten(2).transpose(1, 2)  # (B, n, d_v)
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, d_v)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)  # (B, 1 + n, d_v)
        return visual.ln_pre(x)

    def frozen_prefix(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Output of the frozen blocks (`config.frozen_blocks`), `(B, 1 + n, d_v)`; what the feature cache stores."""
        x = self.embed(pixel_values)
        for block in self.blocks[: self.first_adapted_block]:
            x = block(x)
        return x

    def adapted_blocks(self, x: torch.Tensor, with_prompts: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the blocks after the frozen prefix, with a new set of deep prompts before each (when the config has
        them and `with_prompts`; FSGR's `forward_deep_prompt`).

        Returns the final tokens `(B, 1 + n, d_v)` (`prompt_norm`ed when prompted) and the last block's input
        `(B, 1 + n, d_v)`, from which the dense embeddings are computed. Neither carries the prompts: each block
        replaces the previous block's prompts and the last block's are dropped, so they enter as keys and values
        only (`prompted_block`).
        """
        prompted = with_prompts and self.prompts is not None
        prompt_kv = self.prompt_keys_values(x.dtype) if prompted else None
        last_input = x
        for i, block in enumerate(self.blocks[self.first_adapted_block :]):
            last_input = x
            run, args = (prompted_block, (block, x, prompt_kv[i])) if prompted else (block, (x,))
            if self.gradient_checkpointing and torch.is_grad_enabled():  # the trained blocks dominate the memory
                x = self._gradient_checkpointing_func(run, *args)
            else:
                x = run(*args)
        return (self.prompt_norm(x) if prompted else x), last_input

    def prompt_keys_values(self, dtype: torch.dtype) -> list[torch.Tensor]:
        """Each adapted block's deep prompts as that block's attention keys and values, `(P, 2 d_v)` per block.

        They depend on the weights only, not on the image: inference (eval mode, no grad) reuses them while the
        weights they are made from are the same tensors, unchanged (`data_ptr`, `_version`), which saves 4-8% of
        a vit-b16 captioning call at batch 1 (docs/benchmarks-mechanisms.md). Training, and LoRA-wrapped attention
        (whose adapters can be switched off), makes them on every call, once per batch.
        """
        blocks = self.blocks[self.first_adapted_block :]
        reusable = not (self.training or torch.is_grad_enabled()) and all(
            type(block.attn) is nn.MultiheadAttention for block in blocks
        )
        if reusable:
            weights = [self.prompts, *self.prompt_proj.parameters()]
            weights += [w for block in blocks for w in (*block.ln_1.parameters(), block.attn.in_proj_weight,
                                                        block.attn.in_proj_bias)]
            identity = (dtype, *((w.data_ptr(), w._version) for w in weights))
            if self._prompt_kv is not None and self._prompt_kv[0] == identity:
                return self._prompt_kv[1]
        keys_values = []
        for prompts, block in zip(self.prompts, blocks):
            prompt = self.prompt_dropout(self.prompt_proj(prompts.to(dtype)))  # (P, d_v)
            _, in_weight, in_bias, _, _ = attention_projections(block.attn)
            width = prompt.shape[-1]
            keys_values.append(F.linear(block.ln_1(prompt), in_weight[width:], in_bias[width:]))  # (P, 2 d_v)
        self._prompt_kv = (identity, keys_values) if reusable else None
        return keys_values

    def dense_embeddings(self, last_input: torch.Tensor, n_patches: int, with_prompts: bool = True) -> torch.Tensor:
        """Dense CLIP-space patch embeddings, `(B, n, d_clip)`: the last block rerun on the patches of its input
        `last_input` `(B, 1 + n, d_v)` with `config.dense_attention`, then (prompted, as FSGR's
        `forward_deep_prompt` does) `prompt_norm`, then `ln_post` and the CLIP projection.

        `"sclip"`: SCLIP's correlative self-attention among the patches (`correlative_attention`), the block's
        residuals and MLP kept, as SCLIP's code and FSGR's `custom_last_layer` (the patches only, without the class
        token and prompts) have them. `"maskclip"`: every patch attends only to itself (its value path), run as
        a sequence of length one through the block, which is that self-only attention without an `(L, L)` mask.
        """
        patches = last_input[:, -n_patches:]  # (B, n, d_v)
        block = self.blocks[-1]
        if self.dense_attention == "sclip":
            x = patches + block.ls_1(correlative_attention(block.attn, block.ln_1(patches)))  # (B, n, d_v)
            x = x + block.ls_2(block.mlp(block.ln_2(x)))
        elif type(block.attn) is nn.MultiheadAttention and not hasattr(block, "ln_1_kv"):
            x = value_path(block, patches)  # (B, n, d_v)
        else:  # LoRA-adapted attention (training): the wrapped layer computes W + ΔW
            batch, _, width = patches.shape
            x = block(patches.reshape(batch * n_patches, 1, width)).view(batch, n_patches, width)  # (B, n, d_v)
        if with_prompts and self.prompt_norm is not None:
            x = self.prompt_norm(x)
        return self.visual.ln_post(x) @ self.visual.proj  # (B, n, d_clip)

    def set_adapters_enabled(self, enabled: bool) -> None:
        for module in self.visual.modules():
            if isinstance(module, BaseTunerLayer):
                module.enable_adapters(enabled)


# ==============================================================================================================
# FSGR encoder: concept codebook, semantic quantisation, SupCon head, cross-modal interaction
# ==============================================================================================================
class FsgrPmaConceptCodebook(nn.Module):
    """Frozen concept codebook C, `(num_concepts, d_clip)`: CLIP text embeddings of the concept vocabulary.

    A persistent buffer (saved in `model.safetensors`, never trained). A fresh model holds seeded random unit vectors
    (`placeholder`) until `set_codebook` loads the embeddings made by `scripts/build_codebook.py`.
    """

    def __init__(self, config: FsgrPmaConfig):
        super().__init__()
        self.register_buffer("embeddings", self.placeholder(config).to(torch.get_default_device()))

    @staticmethod
    def placeholder(config: FsgrPmaConfig) -> torch.Tensor:
        """The codebook of a fresh model, `(num_concepts, d_clip)`: seeded random unit vectors, the same every time (so
        that a model initialised on the meta device gets the buffer `__init__` gives)."""
        generator = torch.Generator().manual_seed(0)
        return F.normalize(torch.randn(config.num_concepts, config.clip_embed_dim, generator=generator), dim=-1)


class FsgrPmaSupConHead(nn.Module):
    """Per-patch projection head z_i = normalize(LN(Dropout(CELU(W [p_i ; g])))) (FSGR code)."""

    def __init__(self, config: FsgrPmaConfig):
        super().__init__()
        self.proj = nn.Linear(2 * config.vision_width, config.supcon_dim)
        self.dropout = nn.Dropout(config.dropout)
        self.norm = nn.LayerNorm(config.supcon_dim, eps=config.layer_norm_eps)

    def forward(self, patches: torch.Tensor, global_token: torch.Tensor) -> torch.Tensor:
        """`(B, n, d_v)` patches and `(B, d_v)` global token → `(B, n, supcon_dim)` unit vectors."""
        g = global_token[:, None].expand_as(patches)  # (B, n, d_v)
        z = self.proj(torch.cat([patches, g], dim=-1))  # (B, n, supcon_dim)
        return F.normalize(self.norm(self.dropout(F.celu(z))), dim=-1)


class FsgrPmaInteractionLayer(nn.Module):
    """FSGR fine-grained cross-modal interaction: visual queries attend to the language-bridged map.

    Pre-LN; 2-D sine positions are added to queries and keys (not values), as in DETR.
    """

    def __init__(self, config: FsgrPmaConfig):
        super().__init__()
        self.norm_query = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.norm_kv = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = FsgrPmaCrossAttention(config)
        self.norm_mlp = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = FsgrPmaMLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self, visual: torch.Tensor, language: torch.Tensor, positions: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`visual` `(B, n, d)` queries, `language` `(B, n, d)` keys/values, `positions` `(n, d)`.

        Returns the new visual tokens `(B, n, d)` and, with `output_attentions`, the weights `(B, h, n, n)`.
        """
        kv = self.norm_kv(language)
        attended, weights = self.attn(
            self.norm_query(visual) + positions, key_states=kv + positions, value_states=kv,
            output_attentions=output_attentions,
        )
        visual = visual + self.dropout(attended)
        return visual + self.mlp(self.norm_mlp(visual)), weights


class FsgrPmaEncoder(nn.Module):
    """The FSGR image encoder: `encode_image` → `quantize` → `cross_attend`.

    `forward` returns an [`FsgrPmaEncoderOutput`]; `last_hidden_state` is the visual memory the decoder reads.
    """

    main_input_name = "pixel_values"

    def __init__(self, config: FsgrPmaConfig):
        super().__init__()
        self.config = config
        self.tower = FsgrPmaVisionTower(config)
        self.codebook = FsgrPmaConceptCodebook(config)
        self.supcon_head = FsgrPmaSupConHead(config) if config.supcon_weight > 0 else None
        self.visual_proj = nn.Linear(config.vision_width, config.hidden_size)
        if config.use_fsgr:
            self.language_proj = nn.Linear(config.clip_embed_dim, config.hidden_size)
            self.interaction = nn.ModuleList(
                FsgrPmaInteractionLayer(config) for _ in range(config.num_interaction_layers)
            )
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    # -- stage 1 ------------------------------------------------------------------------------------------------
    def frozen_prefix(
        self, pixel_values: torch.Tensor | None, vision_hidden_states: torch.Tensor | None
    ) -> torch.Tensor:
        """Validate the image input and return the frozen blocks' output `(B, 1 + n, d_v)`.

        Args:
            pixel_values: `(B, 3, image_size, image_size)` images, or
            vision_hidden_states: `(B, 1 + n, d_v)` cached output of the frozen blocks.
        """
        config = self.config
        if (pixel_values is None) == (vision_hidden_states is None):
            raise ValueError("Pass exactly one of `pixel_values` or `vision_hidden_states` (cached features)")
        if vision_hidden_states is not None:
            expected = (config.num_patches + 1, config.vision_width)
            if vision_hidden_states.ndim != 3 or tuple(vision_hidden_states.shape[1:]) != expected:
                raise ValueError(
                    f"vision_hidden_states must have shape (batch, {expected[0]}, {expected[1]}), "
                    f"got {tuple(vision_hidden_states.shape)}"
                )
            return vision_hidden_states.to(self.tower.visual.conv1.weight.dtype)
        size = config.image_size
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3 or tuple(pixel_values.shape[2:]) != (size, size):
            raise ValueError(
                f"pixel_values must have shape (batch, 3, {size}, {size}), got {tuple(pixel_values.shape)}; "
                "use the model's processor to resize and normalise images"
            )
        with torch.no_grad():  # the prefix is frozen
            return self.tower.frozen_prefix(pixel_values)

    def encode_image(self, prefix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the adapted blocks on the frozen prefix `(B, 1 + n, d_v)`.

        Returns:
            patches `(B, n, d_v)`, global token `(B, d_v)`, global CLIP embedding `(B, d_clip)` and dense CLIP-space
            patch embeddings `(B, n, d_clip)`.
        """
        tokens, last_input = self.tower.adapted_blocks(prefix)
        tokens = self.tower.visual.ln_post(tokens)  # (B, 1 + n, d_v)
        global_token, patches = tokens[:, 0], tokens[:, 1:]
        global_embedding = global_token @ self.tower.visual.proj  # (B, d_clip)
        dense = self.tower.dense_embeddings(last_input, patches.shape[1])  # (B, n, d_clip)
        return patches, global_token, global_embedding, dense

    @torch.no_grad()
    def pseudo_labels(self, prefix: torch.Tensor) -> torch.Tensor:
        """SupCon pseudo-labels `(B, n)`: argmax over the codebook of the *frozen* tower's dense embeddings."""
        self.tower.set_adapters_enabled(False)
        try:
            tokens, last_input = self.tower.adapted_blocks(prefix, with_prompts=False)
            dense = self.tower.dense_embeddings(last_input, tokens.shape[1] - 1, with_prompts=False)  # (B, n, d_clip)
        finally:
            self.tower.set_adapters_enabled(True)
        return (F.normalize(dense.float(), dim=-1) @ self.codebook.embeddings.float().T).argmax(-1)  # (B, n)

    # -- stage 2 ------------------------------------------------------------------------------------------------
    def quantize(
        self, dense: torch.Tensor, global_embedding: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """FSGR semantic quantisation onto the frozen codebook.

        Pre-select the top-k concepts per image by similarity with the global embedding; assign every patch to
        one of them (hard Gumbel-softmax with a straight-through gradient in training, argmax in eval); normalise
        per concept, Â = A / (ΣA + 1); the language-bridged map is T = Â C_sel.

        Args:
            dense: `(B, n, d_clip)` dense patch embeddings.
            global_embedding: `(B, d_clip)`.

        Returns:
            language map `(B, n, d_clip)`, patch concepts `(B, n)`, selected concepts `(B, k)`, and the selected
            concept embeddings `(B, k, d_clip)`.
        """
        codebook = self.codebook.embeddings.to(dense.dtype)  # (N_c, d_clip)
        image_scores = F.normalize(global_embedding, dim=-1) @ codebook.T  # (B, N_c)
        selected = image_scores.topk(self.config.concept_top_k, dim=-1).indices  # (B, k)
        concepts = codebook[selected]  # (B, k, d_clip)
        # The CLIP checkpoint's own logit scale turns cosine similarities into assignment logits (FSGR's code).
        scale = self.config.concept_logit_scale
        logits = scale * F.normalize(dense, dim=-1) @ concepts.transpose(1, 2)  # (B, n, k)
        if self.training:
            assignment = F.gumbel_softmax(logits.float(), tau=1.0, hard=True)
            assignment = assignment.to(dense.dtype)  # (B, n, k), one-hot forward, soft gradient
        else:
            assignment = F.one_hot(logits.argmax(-1), self.config.concept_top_k).to(dense.dtype)  # (B, n, k)
        normalised = assignment / (assignment.sum(dim=1, keepdim=True) + 1.0)  # (B, n, k)
        language = normalised @ concepts  # (B, n, d_clip)
        patch_concepts = selected.gather(1, assignment.argmax(-1))  # (B, n)
        return language, patch_concepts, selected, concepts

    # -- stage 3 ------------------------------------------------------------------------------------------------
    def cross_attend(
        self,
        patches: torch.Tensor,
        language: torch.Tensor,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> tuple[torch.Tensor, tuple | None, tuple | None]:
        """N_s interaction layers: `(B, n, d_v)` patches query `(B, n, d_clip)` language map → `(B, n, d)`.

        Returns the visual tokens, and (when asked for) the stream's hidden states and the layers' attentions.
        """
        visual = self.visual_proj(patches)  # (B, n, d)
        positions = sine_positions_2d(self.config.grid_size, visual.shape[-1], visual.device, visual.dtype)
        keys = self.language_proj(language)  # (B, n, d); fixed across layers
        all_hidden = (visual,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer in self.interaction:
            visual, weights = layer(visual, keys, positions, output_attentions)
            if output_hidden_states:
                all_hidden += (visual,)
            if output_attentions:
                all_attentions += (weights,)
        return visual, all_hidden, all_attentions

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        vision_hidden_states: torch.Tensor | None = None,
        patch_labels: torch.LongTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> FsgrPmaEncoderOutput:
        """Encode images (or cached frozen-prefix features) into the visual memory Z.

        `output_attentions` / `output_hidden_states` default to the config's; `**kwargs` (e.g. the `return_dict`
        that `generate` passes) are ignored.
        """
        config = self.config
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        prefix = self.frozen_prefix(pixel_values, vision_hidden_states)
        patches, global_token, global_embedding, dense = self.encode_image(prefix)
        language, patch_concepts, selected, _ = self.quantize(dense, global_embedding)
        if config.use_fsgr:
            memory, hidden_states, attentions = self.cross_attend(
                patches, language, output_attentions, output_hidden_states
            )  # (B, n, d)
        else:
            positions = sine_positions_2d(config.grid_size, config.hidden_size, prefix.device, prefix.dtype)
            memory = self.visual_proj(patches) + positions  # (B, n, d)
            hidden_states = (memory,) if output_hidden_states else None
            attentions = () if output_attentions else None

        supcon_features = None
        if self.supcon_head is not None and self.training:
            supcon_features = self.supcon_head(patches, global_token)  # (B, n, supcon_dim)
            if patch_labels is None:
                patch_labels = self.pseudo_labels(prefix)
        return FsgrPmaEncoderOutput(
            last_hidden_state=self.norm(memory),
            hidden_states=hidden_states,
            attentions=attentions,
            patch_concepts=patch_concepts,
            selected_concepts=selected,
            supcon_features=supcon_features,
            patch_labels=patch_labels,
        )


# ==============================================================================================================
# Prototypical memory attention (PMA-Net)
# ==============================================================================================================
def kmeans(
    points: torch.Tensor,
    num_clusters: int,
    iters: int,
    seed: int,
    backend: str = "auto",
    init: torch.Tensor | None = None,
) -> torch.Tensor:
    """K-Means centroids `(num_clusters, d)` of `points` `(N, d)`, float32, deterministic for a seed.

    Both backends start from the same centroids, `init` `(num_clusters, d)` when given (a warm start from the
    previous prototypes) or else seeded k-means++, and run Lloyd iterations, so they agree up to floating-point
    order. `backend` is `"faiss"`, `"torch"` or `"auto"` (FAISS when importable); FAISS uses every
    point (`max_points_per_centroid = N`, no subsampling) and the GPU when the points are on one and it can.
    """
    n_points, dim = points.shape
    if n_points < num_clusters:
        raise ValueError(
            f"K-Means needs at least as many bank entries as prototypes: {n_points} entries < {num_clusters} "
            "prototypes (train longer before the first refresh, or lower num_prototypes)"
        )
    if backend == "auto":
        backend = "faiss" if faiss is not None else "torch"
    if backend not in ("faiss", "torch"):
        raise ValueError(f"Unknown K-Means backend {backend!r}; use 'faiss', 'torch' or 'auto'")
    points = points.detach().float()
    if init is not None and init.shape != (num_clusters, dim):
        raise ValueError(f"K-Means init must have shape {(num_clusters, dim)}, got {tuple(init.shape)}")
    centroids = kmeans_plus_plus(points, num_clusters, seed) if init is None else init.detach().float().clone()
    if backend == "torch":
        return _lloyd(points, centroids, iters)
    if faiss is None:
        raise ImportError("backend='faiss' needs the faiss package: pip install faiss-cpu (or faiss-gpu-cu12)")
    use_gpu = points.is_cuda and hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
    km = faiss.Kmeans(
        dim, num_clusters, niter=iters, seed=seed, gpu=use_gpu, max_points_per_centroid=n_points, verbose=False
    )
    km.train(points.cpu().numpy(), init_centroids=centroids.cpu().numpy())
    return torch.from_numpy(km.centroids).to(points.device)


def kmeans_plus_plus(points: torch.Tensor, num_clusters: int, seed: int) -> torch.Tensor:
    """Seeded k-means++ initial centroids `(num_clusters, d)` (Arthur & Vassilvitskii 2007): D² sampling."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    chosen = [int(torch.randint(len(points), (1,), generator=generator))]
    distances = (points - points[chosen[0]]).pow(2).sum(1)  # (N,)
    for _ in range(num_clusters - 1):
        weights = distances.cpu().double()
        weights = weights if weights.sum() > 0 else torch.ones_like(weights)  # all points identical
        chosen.append(int(torch.multinomial(weights, 1, generator=generator)))
        distances = torch.minimum(distances, (points - points[chosen[-1]]).pow(2).sum(1))
    return points[chosen].clone()


def _lloyd(points: torch.Tensor, centroids: torch.Tensor, iters: int) -> torch.Tensor:
    """Lloyd iterations from `centroids` `(m, d)`; an empty cluster keeps its centroid."""
    for _ in range(iters):
        assignment = torch.cdist(points, centroids).argmin(1)  # (N,)
        sums = torch.zeros_like(centroids).index_add_(0, assignment, points)  # (m, d)
        counts = torch.bincount(assignment, minlength=len(centroids))  # (m,)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
    return centroids


def nearest_neighbours(points: torch.Tensor, queries: torch.Tensor, k: int, backend: str = "auto") -> torch.Tensor:
    """Indices `(Q, k)` of the k nearest `points` `(N, d)` (L2) of every query `(Q, d)`."""
    if backend == "auto":
        backend = "faiss" if faiss is not None else "torch"
    if backend == "faiss":
        index = faiss.IndexFlatL2(points.shape[1])
        index.add(points.detach().float().cpu().numpy())
        _, indices = index.search(queries.detach().float().cpu().numpy(), k)
        return torch.from_numpy(indices).to(points.device)
    return torch.cdist(queries.float(), points.float()).topk(k, dim=1, largest=False).indices  # (Q, k)


class FsgrPmaPrototypeMemoryAttention(nn.Module):
    """Masked self-attention that also attends to m prototypes of past keys/values (PMA-Net, §3).

    Keys are `[K + s_seq ; M_K + s_mem]` and values `[V ; M_V]`, with learned segment embeddings s. The causal
    mask covers the sequence columns only; every position sees all prototypes. Prototypes are persistent
    buffers (saved with the weights) and never enter the KV cache.

    Two controls that the paper does not have (our extension): with `config.memory_prior`, a learned per-head
    log-prior b_h (initialised at -log m) is added to every prototype logit, so the memory's share of attention is
    learned rather than set by the number of prototypes; and `memory_ramp` r in (0, 1] (a training schedule, set by
    `FsgrPmaForConditionalGeneration.set_memory_ramp`, 1 at rest) adds log r to them, which fades the memory in
    after a refresh instead of switching it on at once.

    A query q scores the keys q·k + q·s_seq and q·m + q·s_mem; the softmax ignores the shift q·s_seq common to all
    of them, so the layer scores the keys q·k and the prototypes q·m + q·(s_mem - s_seq): the same weights, outputs
    and gradients (a softmax's score gradients sum to zero), with the segments costing one logit per query and head
    rather than an addition to every key or prototype at every step.

    In training mode, a random subsample of every step's non-padding keys/values goes into a ring-buffer bank
    (`memory_window * memory_tokens_per_step` entries, `prototype_dtype`, no gradient). `refresh_prototypes`
    clusters the bank: M_K = K-Means(B_K), and M_V[j] = mean of the values whose keys are the k nearest bank
    keys of centroid j. The prototypes, which every decoding step reads, are kept in the model's dtype.
    Source: https://github.com/aimagelab/PMA-Net (paper description; the official code was not released).
    """

    def __init__(self, config: FsgrPmaConfig, layer_idx: int):
        super().__init__()
        d = config.hidden_size
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = d // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.dropout = config.dropout
        self.qkv_proj = nn.Linear(d, 3 * d)
        self.out_proj = nn.Linear(d, d)
        self.memory_enabled = config.use_memory
        if config.use_memory:
            self.segment_sequence = nn.Parameter(torch.zeros(d))
            self.segment_memory = nn.Parameter(torch.zeros(d))
            self.register_buffer("prototype_keys", torch.zeros(config.num_prototypes, d))
            self.register_buffer("prototype_values", torch.zeros(config.num_prototypes, d))
            self.register_buffer("prototype_ready", torch.zeros(1, dtype=torch.bool))
            if config.memory_prior:
                self.prototype_log_prior = nn.Parameter(torch.full((self.num_heads,), -math.log(config.num_prototypes)))
        self.memory_ramp = 1.0
        # The bank is training state, not a weight: allocated on first use, saved by the training checkpoint.
        self.bank_keys: torch.Tensor | None = None
        self.bank_values: torch.Tensor | None = None
        self.bank_next = 0
        self.bank_filled = 0
        self._pending: torch.Tensor | None = None
        self._ready_value = False  # `prototype_ready` as last read in eager mode (see `_is_ready`); never saved

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:-1], self.num_heads, self.head_dim).transpose(-3, -2)  # (..., h, L, hd)

    def _is_ready(self) -> bool:
        """`prototype_ready` as a Python bool, read from the buffer in eager mode and kept for traced code.

        `torch.compile` and `torch.export` use the value last read in eager mode (a data-dependent branch cannot be
        traced; dynamo guards on the value, so a compiled forward is traced again after it changes). Refreshing,
        `from_pretrained` and weight initialisation read it, so a loaded or refreshed model compiles with its memory.
        """
        if not torch.compiler.is_compiling():
            self._ready_value = bool(self.prototype_ready.item())
        return self._ready_value

    @property
    def memory_active(self) -> bool:
        return self.memory_enabled and self._is_ready()

    def memory_heads(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Per-head prototype keys M_K and values M_V, `(h, m, hd)` views of the buffers, and the segments' offset
        s_mem - s_seq of the keys, `(h, hd, 1)`; None while there are no prototypes."""
        if not self.memory_active:
            return None
        keys = self._split_heads(self.prototype_keys.to(dtype))  # (h, m, hd)
        values = self._split_heads(self.prototype_values.to(dtype))  # (h, m, hd)
        offset = (self.segment_memory - self.segment_sequence).to(dtype).view(self.num_heads, self.head_dim, 1)
        return keys, values, offset

    def idle_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters that only the prototypes use (segment embeddings, log-prior): all of them while the
        memory is empty, none once it is active or when it is off."""
        if not self.memory_enabled or self.memory_active:
            return []
        idle = [self.segment_sequence, self.segment_memory, getattr(self, "prototype_log_prior", None)]
        return [param for param in idle if param is not None and param.requires_grad]

    def memory_bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        """`(h, 1, 1)` addend of every prototype logit: the log-prior plus log `memory_ramp`; None when both are off."""
        prior = getattr(self, "prototype_log_prior", None)
        if prior is None and self.memory_ramp == 1.0:
            return None
        ramp = math.log(self.memory_ramp)
        bias = (prior.to(dtype) + ramp) if prior is not None else torch.full((self.num_heads,), ramp, dtype=dtype)
        return bias.view(self.num_heads, 1, 1)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        token_mask: torch.Tensor | None = None,
        past_key_values: EncoderDecoderCache | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Self-attention over `(B, T, d)` with a boolean `(B, 1, T, S)` mask (True = attend; None = all).

        `token_mask` `(B, T)` marks the non-padding positions whose keys/values may enter the bank.
        """
        batch, length, width = hidden_states.shape
        qkv = self.qkv_proj(hidden_states)  # (B, T, 3d)
        if self.training and self.memory_enabled:
            self._pending = self.sample_for_bank(qkv[..., width:], token_mask)  # committed after the forward
        heads = qkv.view(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, h, T, hd)
        query, key, value = heads.unbind(0)  # (B, h, T, hd) each, views of qkv
        memory = self.memory_heads(key.dtype)  # (h, m, hd) keys and values, (h, hd, 1) offset; or None
        if past_key_values is not None:
            key, value = past_key_values.self_attention_cache.update(key, value, self.layer_idx)  # (B, h, S, hd)
        dropout = self.dropout if self.training else 0.0
        attention = attention_function(self.config)
        if memory is None:
            out, weights = attention(
                self, query, key, value, attention_mask, dropout=dropout, scaling=self.scaling, is_causal=False,
                output_attentions=output_attentions,
            )  # (B, T, h, hd)
        else:  # its own softmax for either implementation; the weights are eager's to return
            with_weights = output_attentions and attention is eager_attention_forward
            out, weights = attend_with_prototypes(
                query, key, value, attention_mask, *memory, self.memory_bias(key.dtype), dropout, with_weights
            )
            out = out.transpose(1, 2)  # (B, T, h, hd)
        out = out.reshape(*hidden_states.shape)  # (B, T, d)
        return self.out_proj(out), (weights if output_attentions else None)

    # -- memory bank ----------------------------------------------------------------------------------------------
    def sample_for_bank(self, keys_values: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
        """A random subset of at most `memory_tokens_per_step` non-padding rows of `(B, T, 2d)` keys | values.

        Returns the detached `(n_keep, 2d)` rows, keys then values. The rows are drawn before gathering, so only the
        kept rows are copied.
        """
        if token_mask is None:
            rows = torch.arange(keys_values.shape[0] * keys_values.shape[1], device=keys_values.device)  # (B * T,)
        else:
            rows = token_mask.flatten().nonzero().squeeze(1)  # (N_valid,)
        if len(rows) > self.config.memory_tokens_per_step:
            rows = rows[torch.randperm(len(rows), device=rows.device)[: self.config.memory_tokens_per_step]]
        return keys_values.detach().flatten(0, 1)[rows]  # (n_keep, 2d)

    def commit_to_bank(self) -> None:
        """Push the keys/values recorded by the last training forward into the ring buffer."""
        if self._pending is None:
            return
        rows, self._pending = self._pending, None  # (n, 2d), n <= memory_bank_size
        size, width = self.config.memory_bank_size, rows.shape[-1] // 2
        if self.bank_keys is None or self.bank_keys.device != rows.device:
            dtype = getattr(torch, self.config.prototype_dtype)
            self.bank_keys = torch.zeros(size, width, dtype=dtype, device=rows.device)
            self.bank_values = torch.zeros_like(self.bank_keys)
            self.bank_next = self.bank_filled = 0
        # Slice copies, not index writes: the rows go to [next, size) and, if they wrap, on from slot 0.
        head = min(len(rows), size - self.bank_next)
        for start, part in ((self.bank_next, rows[:head]), (0, rows[head:])):
            if len(part):
                self.bank_keys[start : start + len(part)] = part[:, :width]
                self.bank_values[start : start + len(part)] = part[:, width:]
        self.bank_next = (self.bank_next + len(rows)) % size
        self.bank_filled = min(self.bank_filled + len(rows), size)

    def bank_contents(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The filled part of the bank, `(N, d)` keys and values (empty tensors before the first step)."""
        if self.bank_keys is None:
            empty = self.prototype_keys.new_zeros(0, self.config.hidden_size)
            return empty, empty
        return self.bank_keys[: self.bank_filled], self.bank_values[: self.bank_filled]

    def bank_nbytes(self) -> int:
        return 0 if self.bank_keys is None else 2 * self.bank_keys.numel() * self.bank_keys.element_size()

    @torch.no_grad()
    def refresh_prototypes(self, keys: torch.Tensor, values: torch.Tensor, seed: int, backend: str = "auto") -> None:
        """Cluster `(N, d)` bank keys into m prototype keys; prototype values are kNN means of the bank values.

        The first refresh starts K-Means from k-means++ seeded with `seed` plus the layer index (layers start from
        different centroids); later ones start from the current prototype keys, so that each prototype moves with
        its cluster rather than being re-drawn (and re-shuffled) at every refresh.
        """
        config = self.config
        seed = seed + self.layer_idx
        previous = self.prototype_keys.float() if self.prototype_ready.item() else None
        centroids = kmeans(
            keys.float(), config.num_prototypes, config.memory_kmeans_iters, seed, backend, init=previous
        )  # (m, d)
        neighbours = nearest_neighbours(keys.float(), centroids, min(config.memory_knn, len(keys)), backend)  # (m, k)
        prototype_values = values.float()[neighbours].mean(dim=1)  # (m, d)
        self.prototype_keys.copy_(centroids.to(self.prototype_keys))
        self.prototype_values.copy_(prototype_values.to(self.prototype_values))
        self.prototype_ready.fill_(True)
        self._is_ready()  # read the flag now, for a forward compiled afterwards


# ==============================================================================================================
# Decoder
# ==============================================================================================================
class FsgrPmaDecoderLayer(GradientCheckpointingLayer):
    """Pre-LN GPT-style layer: prototype-memory causal self-attention → cross-attention to Z → MLP."""

    def __init__(self, config: FsgrPmaConfig, layer_idx: int):
        super().__init__()
        self.norm_self = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = FsgrPmaPrototypeMemoryAttention(config, layer_idx)
        self.norm_cross = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.cross_attn = FsgrPmaCrossAttention(config, layer_idx)
        self.norm_mlp = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = FsgrPmaMLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        past_key_values: EncoderDecoderCache | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        attended, self_weights = self.self_attn(
            self.norm_self(hidden_states), attention_mask, token_mask, past_key_values, output_attentions
        )
        hidden_states = hidden_states + self.dropout(attended)
        attended, cross_weights = self.cross_attn(
            self.norm_cross(hidden_states), encoder_hidden_states, None, past_key_values, output_attentions
        )
        hidden_states = hidden_states + self.dropout(attended)
        hidden_states = hidden_states + self.mlp(self.norm_mlp(hidden_states))
        return hidden_states, self_weights, cross_weights


class FsgrPmaDecoder(nn.Module):
    """Word + learned position embeddings, N memory-augmented layers, final LayerNorm."""

    def __init__(self, config: FsgrPmaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(FsgrPmaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False

    def forward(
        self,
        input_ids: torch.LongTensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: EncoderDecoderCache | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> tuple[torch.Tensor, tuple | None, tuple | None, tuple | None]:
        """`input_ids` `(B, T)` new tokens; `attention_mask` `(B, past + T)` over the whole sequence (1 = token)."""
        batch, length = input_ids.shape
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if attention_mask is not None and attention_mask.shape != (batch, past + length):
            raise ValueError(
                f"decoder attention_mask must have shape (batch, past + new tokens) = {(batch, past + length)}, "
                f"got {tuple(attention_mask.shape)}"
            )
        if past + length > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence length {past + length} exceeds max_position_embeddings "
                f"({self.config.max_position_embeddings}); lower max_new_tokens"
            )
        if attention_mask is None:  # no padding: positions past … past + T - 1, rows of the table
            position_embeddings = self.embed_positions.weight[past : past + length]  # (T, d)
            # A single new token sees every position: no mask at all (the common decoding step).
            padding_mask = None if length == 1 else input_ids.new_ones(batch, past + length, dtype=torch.bool)
        else:  # positions count real tokens only, so left-padded prompts get the positions of unpadded ones
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]  # (B, T)
            position_embeddings = self.embed_positions(positions)  # (B, T, d)
            padding_mask = attention_mask.bool()
        hidden_states = self.dropout(self.embed_tokens(input_ids) + position_embeddings)  # (B, T, d)
        if self.training and torch.is_grad_enabled():
            idle = [param for layer in self.layers for param in layer.self_attn.idle_parameters()]
            if idle:
                # DDP with find_unused_parameters=False (what the HF Trainer uses with gradient checkpointing) needs
                # every trainable parameter in every step's graph: while the memory is empty its parameters join
                # with weight zero. Values and all other gradients are unchanged; theirs are exact zeros.
                hidden_states = hidden_states + 0.0 * torch.stack([param.sum() for param in idle]).sum()
        mask = None if padding_mask is None else self.causal_mask(padding_mask, length)  # (B, 1, T, past + T)
        token_mask = None if attention_mask is None else attention_mask[:, past:]  # (B, T); None: every token

        all_hidden = (hidden_states,) if output_hidden_states else None
        all_self, all_cross = ((), ()) if output_attentions else (None, None)
        for layer in self.layers:
            hidden_states, self_weights, cross_weights = layer(
                hidden_states, encoder_hidden_states, mask, token_mask, past_key_values, output_attentions
            )
            if output_hidden_states:
                all_hidden += (hidden_states,)
            if output_attentions:
                all_self += (self_weights,)
                all_cross += (cross_weights,)
        return self.norm(hidden_states), all_hidden, all_self, all_cross

    @staticmethod
    def causal_mask(padding_mask: torch.Tensor, length: int) -> torch.Tensor:
        """Boolean `(B, 1, T, S)` mask for the last `length` of `S` positions: causal, padding removed.

        Every query may always attend to itself, so rows of padding queries are never empty (no NaN).
        """
        total = padding_mask.shape[1]
        query_pos = torch.arange(total - length, total, device=padding_mask.device)[:, None]  # (T, 1)
        key_pos = torch.arange(total, device=padding_mask.device)[None, :]  # (1, S)
        causal = key_pos <= query_pos  # (T, S)
        mask = causal[None] & padding_mask[:, None, :]  # (B, T, S)
        return (mask | (key_pos == query_pos)[None])[:, None]  # (B, 1, T, S)


class FsgrPmaCache(EncoderDecoderCache):
    """Self- and cross-attention cache whose cross-attention part holds one copy per image.

    The r rows of one image in `generate` (beams, returned sequences) share its encoder output, so their
    cross-attention keys/values are identical: the cache keeps them once, `(B / r, h, S, hd)`, which also makes beam
    reordering (what `EncoderDecoderCache` does at every beam-search step) a no-op there. Batch selection and
    repetition first restore one row per sequence, and so does `generate` before it returns the cache. Prototypes
    never enter it: memory attention reads them beside the cached sequence (`attend_with_prototypes`).
    """

    rows_per_image = 1  # set by `generate` (`_expand_inputs_for_generation`): the cross-attention part's sharing

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.self_attention_cache.reorder_cache(beam_idx)

    def one_cross_attention_row_per_sequence(self) -> None:
        """Repeat the shared cross-attention keys/values back to one row per sequence: transformers' layout, for a
        batch operation and for the cache that `generate` returns."""
        if self.rows_per_image > 1:
            self.cross_attention_cache.batch_repeat_interleave(self.rows_per_image)
            self.rows_per_image = 1

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.one_cross_attention_row_per_sequence()
        super().batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.one_cross_attention_row_per_sequence()
        super().batch_select_indices(indices)


# ==============================================================================================================
# Model
# ==============================================================================================================
class FsgrPmaPreTrainedModel(PreTrainedModel):
    config_class = FsgrPmaConfig
    config: FsgrPmaConfig
    base_model_prefix = "model"
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["FsgrPmaDecoderLayer", "FsgrPmaInteractionLayer"]
    _skip_keys_device_placement = ["past_key_values"]

    def _init_weights(self, module: nn.Module) -> None:
        """Initialise every parameter and buffer of `module`.

        Runs at construction (`post_init`), for `init_weights()` after building on the meta device and `to_empty()`,
        and for tensors that loading did not write (missing from the checkpoint, or ignored mismatched shapes).
        transformers' guarded init functions never overwrite a loaded tensor. Besides transformers' defaults:
        open_clip's init of the ViT's own parameters, LoRA's (A as `nn.Linear`, B zero), and the buffers' initial
        values (placeholder codebook, empty memory).
        """
        super()._init_weights(module)  # Linear, Conv2d, Embedding, norms, and nn.MultiheadAttention's own init
        config = self.config
        std = config.initializer_range
        if isinstance(module, VisionTransformer):
            # open_clip's init of the ViT's raw parameters (open_clip/transformer.py, VisionTransformer.__init__)
            width = module.class_embedding.shape[-1]
            init.normal_(module.class_embedding, std=width**-0.5)
            init.normal_(module.proj, std=width**-0.5)
            if config.vision_cfg.get("pos_embed_type", "learnable") == "learnable":
                init.normal_(module.positional_embedding, std=width**-0.5)
            else:  # fixed 2-D sine-cosine positions
                positions = get_2d_sincos_pos_embed(width, config.grid_size, cls_token=True)  # (1 + n, d_v)
                init.copy_(module.positional_embedding, torch.from_numpy(positions).float())
        elif isinstance(module, LoraLayer):  # after its A and B, which got nn.Linear's init as children
            init_lora(module)
        elif isinstance(module, LayerScale):
            init.constant_(module.gamma, config.vision_cfg["ls_init_value"])
        elif isinstance(module, FsgrPmaVisionTower) and module.prompts is not None:
            # VPT's init, as FSGR's Transformer.__init__ has it: prompts uniform in ±sqrt(6 / (3 p² + d_v)), the
            # projection Kaiming-normal (fan-out)
            bound = math.sqrt(6.0 / (3 * config.patch_size**2 + config.vision_width))
            init.uniform_(module.prompts, -bound, bound)
            init.kaiming_normal_(module.prompt_proj.weight, a=0, mode="fan_out")
            init.zeros_(module.prompt_proj.bias)
        elif isinstance(module, FsgrPmaConceptCodebook):
            init.copy_(module.embeddings, module.placeholder(config))
        elif isinstance(module, FsgrPmaPrototypeMemoryAttention) and module.memory_enabled:
            init.normal_(module.segment_sequence, std=std)
            init.normal_(module.segment_memory, std=std)
            init.zeros_(module.prototype_keys)
            init.zeros_(module.prototype_values)
            init.zeros_(module.prototype_ready)  # the memory starts empty
            if config.memory_prior:
                init.constant_(module.prototype_log_prior, -math.log(config.num_prototypes))

    def _initialize_weights(self, module: nn.Module, is_custom_code: bool = False) -> None:
        """transformers' `_initialize_weights`, which skips remote-code modules without parameters of their own; PEFT's
        LoRA layers are such modules (A and B are child `nn.Linear`s), and get LoRA's init here for the weights that
        were not loaded."""
        if isinstance(module, LoraLayer) and not getattr(module, "_is_hf_initialized", False):
            self._init_weights(module)
            module._is_hf_initialized = True
            return
        super()._initialize_weights(module, is_custom_code)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`: tensors the checkpoint lacks (or, with `ignore_mismatched_sizes=True`,
        holds in another shape) are initialised by `_init_weights` and named in transformers' loading warning.

        Two kinds of missing data are more than weights, and are handled here:
        - a layer whose prototypes are missing keeps its memory off (`prototype_ready` False) until its first refresh,
          rather than attending to zero prototypes;
        - a missing concept codebook is the placeholder (seeded random unit vectors), which the warning says: the
          concept path (quantisation, pseudo-labels) needs the real one (`set_codebook`).
        """
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        missing = set(info["missing_keys"]) | {key for key, *_ in info["mismatched_keys"]}
        for name, module in model.named_modules():
            prefix = f"{name}." if name else ""
            if isinstance(module, FsgrPmaPrototypeMemoryAttention) and module.memory_enabled:
                if {prefix + "prototype_keys", prefix + "prototype_values"} & missing:
                    module.prototype_ready.fill_(False)
                    logger.warning(
                        f"The checkpoint lacks the prototypes of {name}: its memory stays off until the first refresh "
                        "(`refresh_memory` after training steps fill the bank)"
                    )
                module._is_ready()  # read the loaded flag now, so that a compiled or exported forward sees the memory
            elif isinstance(module, FsgrPmaConceptCodebook) and prefix + "embeddings" in missing:
                logger.warning(
                    f"The checkpoint lacks the concept codebook ({prefix}embeddings): the model holds the placeholder "
                    "(seeded random unit vectors), and its concept path (semantic quantisation, SupCon "
                    "pseudo-labels) needs a real one: load it with `set_codebook` (scripts/build_codebook.py makes it)"
                )
        return (model, info) if want_info else model

    def memory_layers(self) -> list[FsgrPmaPrototypeMemoryAttention]:
        return [layer.self_attn for layer in self.decoder.layers if layer.self_attn.memory_enabled]

    def new_cache(self) -> FsgrPmaCache:
        # Layers are added as they are first written (every layer is full attention): `DynamicCache(config=...)`
        # would deep-copy the config to find the layer types, at every `generate` call.
        return FsgrPmaCache(DynamicCache(), DynamicCache())


class FsgrPmaModel(FsgrPmaPreTrainedModel):
    """The bare FSGR-PMA model: the FSGR image encoder and the PMA-Net decoder, without the LM head.

    Returns the decoder's final hidden states ([`FsgrPmaModelOutput`]); [`FsgrPmaForConditionalGeneration`] holds one
    as `model` (its `base_model`) and adds the tied LM head and the loss.
    """

    def __init__(self, config: FsgrPmaConfig):
        super().__init__(config)
        self.encoder = FsgrPmaEncoder(config)
        self.encoder.tower.visual.requires_grad_(False)  # the CLIP tower is frozen; LoRA and prompts train
        if config.lora_rank > 0 and not config.lora_merged:
            inject_adapter_in_model(self.encoder_lora_config(), self.encoder.tower.visual)
        self.decoder = FsgrPmaDecoder(config)
        self.post_init()

    def get_encoder(self, modality: str | None = None) -> nn.Module:
        """The FSGR image encoder, for `modality` None (the encoder `generate` runs) or `"image"`.

        Other modalities follow `PreTrainedModel.get_encoder`: the model has none, so it returns itself.
        """
        if modality in (None, "image"):
            return self.encoder
        return super().get_encoder(modality=modality)

    def get_decoder(self) -> FsgrPmaDecoder:
        return self.decoder

    def get_input_embeddings(self) -> nn.Embedding:
        return self.decoder.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.decoder.embed_tokens = value

    def encoder_lora_config(self) -> LoraConfig:
        """PEFT `LoraConfig` for the vision blocks from `lora_first_block` up."""
        config = self.config
        blocks = "|".join(str(i) for i in range(config.lora_first_block, config.vision_layers))
        names = "|".join(name.replace(".", r"\.") for name in config.lora_target_modules)
        lora_config = LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=rf"transformer\.resblocks\.({blocks})\.({names})",
        )
        lora_config._register_custom_module({nn.MultiheadAttention: FsgrPmaLoraMultiheadAttention})
        return lora_config

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.FloatTensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs: FsgrPmaEncoderOutput | None = None,
        past_key_values: Cache | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        vision_hidden_states: torch.Tensor | None = None,
        patch_labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> FsgrPmaModelOutput | tuple:
        """Encode the images and decode the captions; the arguments are [`FsgrPmaForConditionalGeneration.forward`]'s
        without `labels`.

        Returns the decoder's final hidden states `(B, T, d)` with the encoder's outputs and the cache (None without
        `use_cache`).
        """
        decoder_input_ids = decoder_input_ids if decoder_input_ids is not None else input_ids
        decoder_attention_mask = decoder_attention_mask if decoder_attention_mask is not None else attention_mask
        if decoder_input_ids is None:
            raise ValueError("Pass caption tokens as `input_ids` / `decoder_input_ids` (or `labels`)")
        config = self.config
        vocab = config.vocab_size
        # Checked in eager mode only: a traced graph cannot branch on the data (torch.compile, torch.export).
        if not torch.compiler.is_compiling() and decoder_input_ids.numel():
            low, high = (bound.item() for bound in torch.aminmax(decoder_input_ids))  # one pass, at every step
            if low < 0 or high >= vocab:
                bad = low if low < 0 else high
                raise ValueError(f"input_ids contain token id {bad}, outside the vocabulary [0, {vocab})")
        use_cache = use_cache if use_cache is not None else (not self.training and config.use_cache)
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states

        if encoder_outputs is None:
            encoder_outputs = self.encoder(
                pixel_values=pixel_values,
                vision_hidden_states=vision_hidden_states,
                patch_labels=patch_labels,
                output_attentions=output_attentions,
                output_hidden_states=output_hidden_states,
            )
        if use_cache and past_key_values is None:
            past_key_values = self.new_cache()
        if not use_cache:
            past_key_values = None

        hidden_states, all_hidden, all_self, all_cross = self.decoder(
            decoder_input_ids,
            encoder_outputs.last_hidden_state,
            decoder_attention_mask,
            past_key_values,
            output_attentions,
            output_hidden_states,
        )
        if self.training:
            for layer in self.memory_layers():
                layer.commit_to_bank()
        return FsgrPmaModelOutput(
            last_hidden_state=hidden_states,
            past_key_values=past_key_values,
            decoder_hidden_states=all_hidden,
            decoder_attentions=all_self,
            cross_attentions=all_cross,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            encoder_hidden_states=encoder_outputs.hidden_states,
            encoder_attentions=encoder_outputs.attentions,
            patch_concepts=encoder_outputs.patch_concepts,
            supcon_features=encoder_outputs.supcon_features,
            patch_labels=encoder_outputs.patch_labels,
        )


class FsgrPmaForConditionalGeneration(FsgrPmaPreTrainedModel, GenerationMixin):
    """FSGR-PMA captioner: [`FsgrPmaModel`] (FSGR image encoder + PMA-Net decoder) with a tied LM head.

    Example:
        ```python
        >>> config = FsgrPmaConfig.from_json_file("configuration/model/tiny.json")
        >>> model = FsgrPmaForConditionalGeneration(config)
        >>> out = model(pixel_values=px, input_ids=ids, labels=ids)  # out.loss, out.logits
        >>> captions = model.generate(pixel_values=px, num_beams=3, max_new_tokens=20)
        ```
    """

    _tied_weights_keys = {"lm_head.weight": "model.decoder.embed_tokens.weight"}

    def __init__(self, config: FsgrPmaConfig):
        super().__init__(config)
        self.model = FsgrPmaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @property
    def encoder(self) -> FsgrPmaEncoder:
        return self.model.encoder

    @property
    def decoder(self) -> FsgrPmaDecoder:
        return self.model.decoder

    # -- HF plumbing --------------------------------------------------------------------------------------------
    def get_encoder(self, modality: str | None = None) -> nn.Module:
        """The FSGR image encoder, for `modality` None (the encoder `generate` runs) or `"image"`; else the model."""
        return self.model.get_encoder(modality) if modality in (None, "image") else super().get_encoder(modality)

    def get_decoder(self) -> FsgrPmaDecoder:
        return self.model.decoder

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def save_pretrained(self, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`; `auto_map` also names this class for `AutoModelForImageTextToText`."""
        auto_map = dict(getattr(self.config, "auto_map", None) or {})
        auto_map["AutoModelForImageTextToText"] = f"modeling_fsgr_pma.{type(self).__name__}"
        self.config.auto_map = auto_map
        return super().save_pretrained(*args, **kwargs)

    # -- model-owned policy ---------------------------------------------------------------------------------------
    def merge_encoder_lora(self) -> None:
        """Fold the tower's LoRA deltas into its weights and drop the adapters (`config.lora_merged = True`).

        A published checkpoint then holds plain open_clip weights that a later PEFT fine-tune can adapt again.
        """
        visual = self.encoder.tower.visual
        adapted = [name for name, module in visual.named_modules() if isinstance(module, BaseTunerLayer)]
        # A LoRA MultiheadAttention wraps a LoRA out_proj of its own; merging the outer layer merges both.
        outermost = [name for name in adapted if not any(name.startswith(other + ".") for other in adapted)]
        for name in outermost:
            module = visual.get_submodule(name)
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(visual.get_submodule(parent_name), child, _unwrap_lora(module))
        visual.requires_grad_(False)
        self.config.lora_merged = True

    @torch.no_grad()
    def load_clip_vision_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Copy an open_clip `model.visual.state_dict()` into the tower (LoRA wrappers add `base_layer` to names)."""
        visual = self.encoder.tower.visual.state_dict(keep_vars=True)
        own = {name.replace(".base_layer", ""): tensor for name, tensor in visual.items()}
        own = {name: tensor for name, tensor in own.items() if "lora_" not in name}
        if set(own) != set(state_dict):
            missing, unexpected = sorted(set(own) - set(state_dict)), sorted(set(state_dict) - set(own))
            raise ValueError(
                f"CLIP vision weights do not match clip_config: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        for name, tensor in state_dict.items():
            if own[name].shape != tensor.shape:
                raise ValueError(f"CLIP weight {name}: shape {tuple(tensor.shape)}, expected {tuple(own[name].shape)}")
            own[name].copy_(tensor)

    def set_codebook(self, embeddings: torch.Tensor, concept_names: list[str] | None = None) -> None:
        """Load the concept codebook `(num_concepts, d_clip)` (rows are L2-normalised here)."""
        expected = (self.config.num_concepts, self.config.clip_embed_dim)
        if tuple(embeddings.shape) != expected:
            raise ValueError(f"codebook must have shape {expected}, got {tuple(embeddings.shape)}")
        if concept_names is not None:
            if len(concept_names) != expected[0]:
                raise ValueError(f"{len(concept_names)} concept names for {expected[0]} codebook rows")
            self.config.concept_names = list(concept_names)
        buffer = self.encoder.codebook.embeddings
        buffer.copy_(F.normalize(embeddings.float(), dim=-1).to(buffer))

    @torch.no_grad()
    def refresh_memory(self, seed: int, backend: str = "auto") -> None:
        """Recompute every layer's prototypes from its own bank (one process; see `training.refresh_memory`).

        Args:
            seed: K-Means seed.
            backend: `"faiss"`, `"torch"` or `"auto"`.
        """
        for layer in self.memory_layers():
            layer.refresh_prototypes(*layer.bank_contents(), seed=seed, backend=backend)

    def set_memory_ramp(self, ramp: float) -> None:
        """Scale every layer's prototype attention weights by `ramp` in (0, 1] before the softmax renormalises them
        (log `ramp` is added to the prototype logits): a training schedule that fades the memory in; 1 at rest."""
        if not 0.0 < ramp <= 1.0:
            raise ValueError(f"memory ramp must lie in (0, 1], got {ramp}")
        for layer in self.memory_layers():
            layer.memory_ramp = float(ramp)

    def num_parameters_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def param_groups(
        self, weight_decay: float, learning_rate: float, backbone_learning_rate: float | None = None
    ) -> list[dict]:
        """Optimiser groups: decay on ≥2-D weights, none on biases, norms, embeddings of positions/segments; the
        vision tower's adapters (LoRA, prompts) at `backbone_learning_rate` (FSGR trains them at 0.1× the rest,
        `build_optimizer` in its `models/fsgr/optim_entry.py`), everything else at `learning_rate`."""
        groups = {}
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            is_matrix = param.ndim >= 2 and "embed_positions" not in name and "prompts" not in name
            in_tower = name.startswith("model.encoder.tower.")
            lr = backbone_learning_rate if in_tower and backbone_learning_rate is not None else learning_rate
            key = (weight_decay if is_matrix else 0.0, lr)
            groups.setdefault(key, []).append(param)
        return [{"params": params, "weight_decay": decay, "lr": lr} for (decay, lr), params in groups.items()]

    # -- forward --------------------------------------------------------------------------------------------------
    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.FloatTensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs: FsgrPmaEncoderOutput | None = None,
        past_key_values: Cache | None = None,
        labels: torch.LongTensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        vision_hidden_states: torch.Tensor | None = None,
        patch_labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> FsgrPmaOutput | tuple:
        """Caption logits and loss.

        Args:
            pixel_values: `(B, 3, H, W)` images (or `vision_hidden_states`, or precomputed `encoder_outputs`).
            decoder_input_ids / input_ids: `(B, T)` caption tokens starting with BOS (the model has no text
                encoder, so `input_ids` is the decoder input, GPT-style).
            decoder_attention_mask / attention_mask: `(B, past + T)`, 1 for tokens, 0 for padding.
            labels: `(B, T)` targets aligned with the inputs (usually the inputs themselves); the model shifts
                them, so logits at t predict label t+1. -100 and padding positions are ignored.
            vision_hidden_states: `(B, 1 + n, d_v)` cached output of the frozen blocks (`extract_features.py`).
            patch_labels: `(B, n)` cached SupCon pseudo-labels.
            output_attentions / output_hidden_states: default to the config's; the attentions need
                `attn_implementation="eager"`.
            return_dict (`bool`, *optional*): `False` returns `FsgrPmaOutput.to_tuple()` (defaults to the config's).
        """
        if decoder_input_ids is None and input_ids is None and labels is not None:
            decoder_input_ids = labels.masked_fill(labels == -100, self.config.pad_token_id)
        outputs = self.model(
            pixel_values=pixel_values,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            encoder_outputs=encoder_outputs,
            past_key_values=past_key_values,
            input_ids=input_ids,
            attention_mask=attention_mask,
            vision_hidden_states=vision_hidden_states,
            patch_labels=patch_labels,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        logits = self.lm_head(outputs.last_hidden_state)  # (B, T, V)

        loss = xe_loss = contrastive = None
        if labels is not None:
            mask = decoder_attention_mask if decoder_attention_mask is not None else attention_mask
            xe_loss = self.caption_loss(logits, labels, mask)
            loss = xe_loss
            if outputs.supcon_features is not None and outputs.patch_labels is not None:
                features = outputs.supcon_features.flatten(0, 1)  # (B * n, supcon_dim)
                contrastive = supcon_loss(features, outputs.patch_labels.flatten(), self.config.supcon_temperature)
                loss = loss + self.config.supcon_weight * contrastive
        return FsgrPmaOutput(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            decoder_hidden_states=outputs.decoder_hidden_states,
            decoder_attentions=outputs.decoder_attentions,
            cross_attentions=outputs.cross_attentions,
            encoder_last_hidden_state=outputs.encoder_last_hidden_state,
            encoder_hidden_states=outputs.encoder_hidden_states,
            encoder_attentions=outputs.encoder_attentions,
            patch_concepts=outputs.patch_concepts,
            xe_loss=xe_loss,
            supcon_loss=contrastive,
        )

    def generate(self, *args, **kwargs):
        """`GenerationMixin.generate`, with an [`FsgrPmaCache`] unless a cache is given or caching is off.

        The cache returned (`return_dict_in_generate`) has transformers' layout, one cross-attention row per sequence.
        """
        generation_config = kwargs.get("generation_config") or self.generation_config
        use_cache = kwargs.get("use_cache", generation_config.use_cache)
        if use_cache and kwargs.get("past_key_values") is None:
            kwargs["past_key_values"] = self.new_cache()
        output = super().generate(*args, **kwargs)
        if isinstance(kwargs.get("past_key_values"), FsgrPmaCache):
            kwargs["past_key_values"].one_cross_attention_row_per_sequence()
        return output

    def _expand_inputs_for_generation(
        self, expand_size: int = 1, is_encoder_decoder: bool = False, input_ids: torch.LongTensor | None = None,
        **model_kwargs,
    ) -> tuple[torch.LongTensor, dict]:
        """`GenerationMixin`'s, which repeats each image's inputs `expand_size` times (beams, returned sequences);
        an empty [`FsgrPmaCache`] learns the count, so that its cross-attention part keeps one copy per image."""
        cache = model_kwargs.get("past_key_values")
        if isinstance(cache, FsgrPmaCache) and not cache.cross_attention_cache.layers:
            cache.rows_per_image = expand_size
        return super()._expand_inputs_for_generation(expand_size, is_encoder_decoder, input_ids, **model_kwargs)

    def caption_loss(
        self, logits: torch.Tensor, labels: torch.LongTensor, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Next-token cross-entropy: logits at t against label t+1, ignoring -100 and padding."""
        targets = labels[:, 1:].clone()  # (B, T-1)
        if attention_mask is not None:
            targets[attention_mask[:, -labels.shape[1] + 1 :] == 0] = -100
        return F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(),
            targets.flatten(),
            ignore_index=-100,
        )


def _unwrap_lora(module: BaseTunerLayer) -> nn.Module:
    """The base layer of a merged LoRA layer, with LoRA wrappers nested inside it (MHA's out_proj) removed."""
    base = module.get_base_layer()
    for name, child in list(base.named_children()):
        if isinstance(child, BaseTunerLayer):
            setattr(base, name, child.get_base_layer())
    # PEFT's merged MultiheadAttention keeps its merged weights as plain tensors: register them as parameters again.
    for owner in base.modules():
        for attr in ("in_proj_weight", "weight"):
            value = owner.__dict__.get(attr)
            if isinstance(value, torch.Tensor):
                del owner.__dict__[attr]
                owner.register_parameter(attr, nn.Parameter(value.detach(), requires_grad=False))
    return base


FsgrPmaConfig.register_for_auto_class()
FsgrPmaForConditionalGeneration.register_for_auto_class("AutoModel")

__all__ = [
    "FsgrPmaCache",
    "FsgrPmaConceptCodebook",
    "FsgrPmaEncoder",
    "FsgrPmaEncoderOutput",
    "FsgrPmaForConditionalGeneration",
    "FsgrPmaModel",
    "FsgrPmaModelOutput",
    "FsgrPmaOutput",
    "FsgrPmaPreTrainedModel",
    "FsgrPmaPrototypeMemoryAttention",
    "kmeans",
    "supcon_loss",
]
