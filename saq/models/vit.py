"""A small Vision Transformer (ViT-Tiny / DeiT-Tiny shape), timm parameter names.

Every matrix multiply with weights is an ``nn.Linear`` (qkv, proj, fc1, fc2, head) and the patch
embedding is an ``nn.Conv2d``, so a converter that swaps Conv2d/Linear for quantized modules
covers the whole network (the patch conv is the "first layer", the head the "last layer").
Names match timm's VisionTransformer (``patch_embed.proj``, ``cls_token``, ``pos_embed``,
``blocks.{i}.norm1/attn.qkv/attn.proj/norm2/mlp.fc1/mlp.fc2``, ``norm``, ``head``), so a timm
``deit_tiny_patch16_224`` state_dict loads.
"""
import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["Attention", "Block", "VisionTransformer", "vit_tiny"]


class PatchEmbed(nn.Module):
    """Non-overlapping patches by a conv with kernel = stride = patch_size.

    [B, in_chans, H, W] -> [B, (H/p) * (W/p), dim].
    """

    def __init__(self, img_size: int, patch_size: int, in_chans: int, dim: int):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"vit: img_size ({img_size}) must be a multiple of patch_size "
                             f"({patch_size})")
        self.img_size = img_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"vit: input is {tuple(x.shape[-2:])} but the model was built for "
                             f"img_size={self.img_size}; build it with img_size={x.shape[-1]}")
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention: qkv = Linear(dim, 3 dim); softmax(q k^T / sqrt(d_h)) v per head;
    proj = Linear(dim, dim). [B, N, dim] -> [B, N, dim]."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"vit: dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, N, d_h]
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    """Linear(dim, hidden) - GELU - Linear(hidden, dim). [B, N, dim] -> [B, N, dim]."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + mlp(LN(x)). [B, N, dim] kept."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """ViT classifier: patch embedding + class token + learned position embedding, ``depth``
    blocks, final LayerNorm, linear head on the class token.

    Input [B, in_chans, img_size, img_size] float -> [B, num_classes] logits.
    """

    def __init__(self, num_classes: int = 1000, img_size: int = 224, patch_size: int = 16,
                 in_chans: int = 3, dim: int = 192, depth: int = 12, num_heads: int = 3,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, dim))
        self.blocks = nn.Sequential(*[Block(dim, num_heads, mlp_ratio, qkv_bias)
                                      for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        # timm's init: truncated normal std 0.02 for embeddings and Linear weights, zero biases.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def vit_tiny(num_classes: int = 1000, img_size: int = 224, patch_size: int = 16,
             in_chans: int = 3, **kw) -> VisionTransformer:
    """ViT-Tiny: dim 192, depth 12, 3 heads, MLP ratio 4 (5.7 M parameters at 1000 classes).

    Defaults take [B, 3, 224, 224] with 16x16 patches; for CIFAR use img_size=32, patch_size=4.
    """
    return VisionTransformer(num_classes=num_classes, img_size=img_size, patch_size=patch_size,
                             in_chans=in_chans, **kw)
