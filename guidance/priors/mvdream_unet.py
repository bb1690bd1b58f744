"""MVDream's multi-view UNet: Stable Diffusion 2.x's LDM UNet plus a camera MLP and joint-view self-attention.

The module tree and attribute names follow the original LDM code (``input_blocks.N.M``,
``middle_block``, ``output_blocks``, ``out``, ``time_embed``, ``camera_embed``), so the
``unet/diffusion_pytorch_model.safetensors`` of an MVDream diffusers folder loads with strict key
matching (``load_unet``). Two changes from SD 2.x:

- ``camera_embed`` (Linear -> SiLU -> Linear) maps each view's 16-number camera to the
  time-embedding width; it is added to the time embedding before any block.
- In every transformer block the self-attention (``attn1``) runs jointly over the N views of one
  object: tokens [B*N, L, C] (views of one object contiguous) are regrouped to [B, N*L, C].
  Cross-attention to the text and the feed-forward stay per view.

Attention is ``torch.nn.functional.scaled_dot_product_attention`` (a fused kernel where the
device has one: the joint sequence is 4 * 32 * 32 = 4096 tokens at the finest level).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn


class MVDreamUNetConfig(BaseModel):
    """The sizes of the network; the defaults are MVDream SD 2.1's (``unet/config.json``).

    ``attention_resolutions`` are downsampling factors (1 = the input resolution) that get a
    transformer; heads = channels / ``num_head_channels``. Channel counts must be multiples of
    ``norm_groups`` (GroupNorm)."""

    model_config = ConfigDict(extra="forbid")

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    num_head_channels: int = 64
    context_dim: int = 1024
    camera_dim: int = 16
    transformer_depth: int = 1
    image_size: int = 32
    norm_groups: int = 32


# unet/config.json keys that describe nothing this module varies (or the original training setup)
IGNORED_CONFIG_KEYS = {"_class_name", "_diffusers_version", "use_checkpoint", "legacy", "use_linear_in_transformer",
                       "use_spatial_transformer"}


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back (LDM's: half-precision statistics drift)."""

    def forward(self, x: Tensor) -> Tensor:
        weight, bias = self.weight.float(), self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """[B] timesteps -> [B, dim] sinusoids laid out [cos | sin], frequencies exp(-ln(max_period) i / (dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, plus a per-channel bias from the embedding, GroupNorm -> SiLU -> conv; residual."""

    def __init__(self, channels: int, emb_dim: int, out_channels: int, groups: int) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm32(groups, channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_channels))
        self.out_layers = nn.Sequential(GroupNorm32(groups, out_channels), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """x [B,C,H,W], emb [B,E] -> [B,C_out,H,W]."""
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Attention(nn.Module):
    """Multi-head attention, q/k/v without bias, scale dim_head^-0.5, through SDPA."""

    def __init__(self, query_dim: int, heads: int, dim_head: int, context_dim: int | None = None) -> None:
        super().__init__()
        inner, context_dim = heads * dim_head, context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """x [B,L,C], context [B,S,D] (None: self-attention) -> [B,L,C]."""
        context = x if context is None else context
        q, k, v = (self._split(proj(src)) for proj, src in ((self.to_q, x), (self.to_k, context), (self.to_v, context)))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).flatten(2))

    def _split(self, x: Tensor) -> Tensor:
        """[B,L,H*d] -> [B,H,L,d]."""
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x: Tensor) -> Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, mult * dim), nn.Dropout(0.0), nn.Linear(mult * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def joint_views(x: Tensor, num_frames: int) -> Tensor:
    """[B*N, L, C] (the N views of one object contiguous) -> [B, N*L, C], view-major."""
    return x.reshape(x.shape[0] // num_frames, num_frames * x.shape[1], x.shape[2])


class BasicTransformerBlock3D(nn.Module):
    """Self-attention over all N views jointly, then per-view cross-attention and GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int) -> None:
        super().__init__()
        self.attn1 = Attention(dim, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = Attention(dim, heads, dim_head, context_dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor, num_frames: int) -> Tensor:
        """x [B*N, L, C], context [B*N, S, D] -> [B*N, L, C]."""
        joint = joint_views(self.norm1(x), num_frames)
        x = x + self.attn1(joint).reshape(x.shape)
        x = x + self.attn2(self.norm2(x), context.to(x.dtype))
        return x + self.ff(self.norm3(x))


class SpatialTransformer3D(nn.Module):
    """GroupNorm -> pixels as tokens -> Linear -> blocks -> Linear -> back to pixels, plus the input."""

    def __init__(self, channels: int, heads: int, dim_head: int, context_dim: int, depth: int, groups: int) -> None:
        super().__init__()
        self.norm = GroupNorm32(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock3D(channels, heads, dim_head, context_dim) for _ in range(depth))
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: Tensor, context: Tensor, num_frames: int) -> Tensor:
        """x [B*N, C, H, W] -> [B*N, C, H, W]."""
        _, _, H, W = x.shape
        h = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))
        for block in self.transformer_blocks:
            h = block(h, context, num_frames)
        return x + self.proj_out(h).transpose(1, 2).unflatten(2, (H, W))


class TimestepEmbedSequential(nn.Sequential):
    """A block of the UNet: passes the embedding to ResBlocks and the text and view count to transformers."""

    def forward(self, x: Tensor, emb: Tensor, context: Tensor, num_frames: int) -> Tensor:  # type: ignore[override]
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer3D):
                x = layer(x, context, num_frames)
            else:
                x = layer(x)
        return x


class MultiViewUNet(nn.Module):
    """epsilon [B*N, C, h, w] for latents of B objects seen from N views each."""

    def __init__(self, cfg: MVDreamUNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        mc, groups = cfg.model_channels, cfg.norm_groups
        emb_dim = 4 * mc
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.camera_embed = nn.Sequential(nn.Linear(cfg.camera_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        def transformer(ch: int) -> SpatialTransformer3D:
            return SpatialTransformer3D(ch, ch // cfg.num_head_channels, cfg.num_head_channels, cfg.context_dim,
                                        cfg.transformer_depth, groups)

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        skips, ch, ds = [mc], mc, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, mult * mc, groups)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(transformer(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skips.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skips.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, emb_dim, ch, groups), transformer(ch), ResBlock(ch, emb_dim, ch, groups))
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skips.pop(), emb_dim, mult * mc, groups)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(transformer(ch))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(GroupNorm32(groups, ch), nn.SiLU(), nn.Conv2d(mc, cfg.out_channels, 3, padding=1))

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor, camera: Tensor, num_frames: int) -> Tensor:
        """x [B*N,C,h,w], timesteps [B*N], context [B*N,S,D], camera [B*N,camera_dim] -> epsilon [B*N,C,h,w].

        The N views of one object are contiguous in the batch; N = 1 is per-image SD."""
        if x.shape[0] % num_frames:
            raise ValueError(f"a batch of {x.shape[0]} images is not whole groups of {num_frames} views")
        dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(timesteps, self.cfg.model_channels).to(dtype))
        emb = emb + self.camera_embed(camera.to(dtype))
        h, skips = x.to(dtype), []
        context = context.to(dtype)
        for block in self.input_blocks:
            h = block(h, emb, context, num_frames)
            skips.append(h)
        h = self.middle_block(h, emb, context, num_frames)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context, num_frames)
        return self.out(h)


class CheckpointMismatch(ValueError):
    """The weight file does not fit the network; the message is one line naming the first offending key."""


def check_state_dict(model: nn.Module, weights: dict[str, Tensor]) -> None:
    """Raises CheckpointMismatch for a missing or unexpected key or a wrong shape (strict loading, one line)."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in weights]
    extra = [k for k in weights if k not in expected]
    if missing:
        raise CheckpointMismatch(f"missing key {missing[0]} ({len(missing)} missing in all)")
    if extra:
        raise CheckpointMismatch(f"unexpected key {extra[0]} ({len(extra)} unexpected in all)")
    for key, shape in expected.items():
        if weights[key].shape != shape:
            raise CheckpointMismatch(f"key {key} has shape {list(weights[key].shape)}, the network needs {list(shape)}")


def load_unet(cfg: MVDreamUNetConfig, path: Path, dtype: torch.dtype, device: torch.device) -> MultiViewUNet:
    """The network of ``cfg`` with the safetensors at ``path`` (strict keys and shapes), in ``dtype`` on ``device``.

    Built on the meta device and given the file's tensors, so no random initialisation is paid for."""
    from safetensors.torch import load_file

    weights = load_file(str(path))
    with torch.device("meta"):
        model = MultiViewUNet(cfg)
    check_state_dict(model, weights)
    model.load_state_dict(weights, strict=True, assign=True)
    return model.to(device=device, dtype=dtype)
