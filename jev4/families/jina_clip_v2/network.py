"""jina-clip-v2's two towers in torch: transformers' JinaEmbeddingsV3Model for text, jev4's own EVA02 for images.

Text tower: transformers 5.23 ships ``JinaEmbeddingsV3Model`` (the
jina-xlm-roberta backbone: post-LN layers, exact "gelu" MLP ``fc1``/``fc2``,
non-interleaved rotary position embedding via Llama's ``apply_rotary_pos_emb``,
no absolute positions; ``models/jina_embeddings_v3/modular_jina_embeddings_v3.py``),
so the text tower is that model with the rotary base set to 20000 and the
converted weights (``checkpoint.py``) loaded strictly, followed by mean pooling
over non-pad tokens (pooling: shared/CLIP_V2.md and jina-ai/openclip
``hf_model.py``'s ``mean_pooler``; no projection, ``add_projections`` false).

Vision tower: EVA02 as in jina-ai/openclip ``src/open_clip/eva_model.py`` and
``rope_embeddings.py`` (cited per class below). Parameter names equal
upstream's, so the checkpoint loads without renaming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from jev4.families.jina_clip_v2.config import TextTowerConfig, VisionTowerConfig

__all__ = [
    "ClipV2TextTower",
    "EvaVisionTower",
    "build_text_backbone",
    "mean_pool",
    "rotate_half_interleaved",
    "text_attention_mask",
    "vision_rope_tables",
]


# --------------------------------------------------------------------------- text


def build_text_backbone(text: TextTowerConfig):
    """transformers' ``JinaEmbeddingsV3Model`` at ``text``'s sizes, rotary base ``text.rotary_emb_base``, no pooler, eval mode."""
    from transformers import JinaEmbeddingsV3Config, JinaEmbeddingsV3Model

    config = JinaEmbeddingsV3Config(
        vocab_size=text.vocab_size,
        hidden_size=text.hidden_size,
        num_hidden_layers=text.num_hidden_layers,
        num_attention_heads=text.num_attention_heads,
        intermediate_size=text.intermediate_size,
        type_vocab_size=text.type_vocab_size,
        pad_token_id=text.pad_token_id,
        layer_norm_eps=text.layer_norm_eps,
        hidden_act="gelu",  # exact (erf) GELU: transformers' ACT2FN["gelu"]
        rope_parameters={"rope_type": "default", "rope_theta": text.rotary_emb_base},
    )
    return JinaEmbeddingsV3Model(config, add_pooling_layer=False).eval()


def text_attention_mask(input_ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """1 where ``input_ids != pad``: upstream's attention and pooling mask (openclip ``hf_model.py`` ``HFTextEncoder.forward``)."""
    return (input_ids != pad_token_id).to(torch.long)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden [B, T, H]`` over positions where ``mask [B, T]`` is 1, in fp32 (openclip ``MeanPooler``)."""
    weights = mask.to(torch.float32).unsqueeze(-1)
    return (hidden.float() * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class ClipV2TextTower(nn.Module):
    """Token ids -> one pooled (not yet normalised) vector per text."""

    def __init__(self, text: TextTowerConfig):
        super().__init__()
        self.config = text
        self.backbone = build_text_backbone(text)

    def load_converted(self, state: dict[str, torch.Tensor]) -> None:
        """Load ``checkpoint.read_checkpoint``'s text dict; strict, so a name the backbone lacks is an error, not a silent skip."""
        self.backbone.load_state_dict(state, strict=True)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return mean_pool(hidden, attention_mask)


# --------------------------------------------------------------------------- vision


def rotate_half_interleaved(x: torch.Tensor) -> torch.Tensor:
    """Pairs ``(x0, x1)`` -> ``(-x1, x0)`` along the last dim (openclip ``rope_embeddings.rotate_half``: interleaved, not halves)."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def vision_rope_tables(vision: VisionTowerConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ``[grid * grid, head_width]`` for the patch tokens, fp32.

    As openclip ``VisionRotaryEmbeddingFast`` built by ``EVAVisionTransformer``:
    ``dim = head_width // 2`` per axis, frequencies ``theta ** -(arange(0, dim, 2) / dim)``;
    positions ``arange(grid) / grid * pt_hw_seq_len`` (frequencies made for
    ``pt_hw_seq_len`` stretched over the grid, ``intp_freq``), each frequency
    repeated twice in a row (interleaved pairs); the row (height) table fills the
    first half of the head, the column (width) table the second; patches in
    row-major order (the conv output flattened).
    """
    dim, grid = vision.head_width // 2, vision.grid
    freqs = vision.rope_theta ** -(torch.arange(0, dim, 2, dtype=torch.float32)[: dim // 2] / dim)
    positions = torch.arange(grid, dtype=torch.float32) / grid * vision.pt_hw_seq_len
    axis = torch.outer(positions, freqs).repeat_interleave(2, dim=-1)  # [grid, dim]
    table = torch.cat((axis[:, None, :].expand(grid, grid, dim), axis[None, :, :].expand(grid, grid, dim)), dim=-1)
    table = table.reshape(grid * grid, 2 * dim)
    return table.cos(), table.sin()


class PatchEmbed(nn.Module):
    """Conv, kernel = stride = patch size (eva_model.py ``PatchEmbed``); the remainder of the image is dropped."""

    def __init__(self, vision: VisionTowerConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, vision.width, kernel_size=vision.patch_size, stride=vision.patch_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(pixels).flatten(2).transpose(1, 2)


class EvaAttention(nn.Module):
    """eva_model.py ``Attention`` with ``subln=True``, ``qkv_bias=True``: q/k/v without bias plus
    ``q_bias`` and ``v_bias`` (k has none); RoPE on patch tokens only (index 0, CLS, untouched);
    softmax scale head_dim ** -0.5; ``inner_attn_ln`` on the merged heads before ``proj``."""

    def __init__(self, vision: VisionTowerConfig):
        super().__init__()
        width, self.heads = vision.width, vision.num_heads
        self.q_proj = nn.Linear(width, width, bias=False)
        self.k_proj = nn.Linear(width, width, bias=False)
        self.v_proj = nn.Linear(width, width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.inner_attn_ln = nn.LayerNorm(width, eps=vision.layer_norm_eps)
        self.proj = nn.Linear(width, width)

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate ``x [B, heads, 1 + patches, head_dim]`` at the patch positions; CLS passes through."""
        patches = x[:, :, 1:]
        rotated = patches * cos.to(x.dtype) + rotate_half_interleaved(patches) * sin.to(x.dtype)
        return torch.cat((x[:, :, :1], rotated), dim=2)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        q = F.linear(x, self.q_proj.weight, self.q_bias)
        k = F.linear(x, self.k_proj.weight)
        v = F.linear(x, self.v_proj.weight, self.v_bias)
        q, k, v = (t.reshape(batch, tokens, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        q, k = self.rope(q, cos, sin), self.rope(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(batch, tokens, width)
        return self.proj(self.inner_attn_ln(out))


class SwiGLU(nn.Module):
    """eva_model.py ``SwiGLU`` with ``subln``: ``w3(ffn_ln(silu(w1 x) * w2 x))``."""

    def __init__(self, vision: VisionTowerConfig):
        super().__init__()
        width, hidden = vision.width, vision.mlp_hidden
        self.w1 = nn.Linear(width, hidden)
        self.w2 = nn.Linear(width, hidden)
        self.ffn_ln = nn.LayerNorm(hidden, eps=vision.layer_norm_eps)
        self.w3 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(self.ffn_ln(F.silu(self.w1(x)) * self.w2(x)))


class EvaBlock(nn.Module):
    """eva_model.py ``Block``, pre-LN (``postnorm`` false, no layer scale: ``ls_init_value`` unset)."""

    def __init__(self, vision: VisionTowerConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(vision.width, eps=vision.layer_norm_eps)
        self.attn = EvaAttention(vision)
        self.norm2 = nn.LayerNorm(vision.width, eps=vision.layer_norm_eps)
        self.mlp = SwiGLU(vision)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin)
        return x + self.mlp(self.norm2(x))


class EvaVisionTower(nn.Module):
    """Pixels ``[B, 3, S, S]`` -> the CLS token after the final ``norm`` (eva_model.py
    ``EVAVisionTransformer.forward_features`` with ``use_mean_pooling=False``, as openclip
    ``model.py`` builds it; ``head`` is Identity since num_classes == width and no proj_type)."""

    def __init__(self, vision: VisionTowerConfig):
        super().__init__()
        self.config = vision
        self.patch_embed = PatchEmbed(vision)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, vision.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, vision.grid**2 + 1, vision.width))
        self.blocks = nn.ModuleList(EvaBlock(vision) for _ in range(vision.layers))
        self.norm = nn.LayerNorm(vision.width, eps=vision.layer_norm_eps)
        cos, sin = vision_rope_tables(vision)
        # Derived from the config, never stored in the checkpoint (shared/CLIP_V2.md): not persistent.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x, self.rope_cos, self.rope_sin)
        return self.norm(x)[:, 0]
